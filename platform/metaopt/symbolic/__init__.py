"""Symbolic discovery of optimizers (Chen et al. 2023): programs, interpreter, analysis, evolution, export."""
