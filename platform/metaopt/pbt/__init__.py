"""Population-based learning-rate adaptation on Ray Tune (PBT, PB2) with equal-budget fixed-LR baselines,
lineage schedule extraction and replay. Entry point: :func:`metaopt.pbt.sweep.run`."""
