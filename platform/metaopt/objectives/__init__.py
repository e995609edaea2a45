"""metaopt.objectives: learned RL objectives.

:mod:`metaopt.objectives.ppo` is a pure JAX PPO whose actor loss takes any mirror-learning
*drift* (Kuba et al. 2022; Lu et al. 2022, "Discovered Policy Optimisation"; Jackson et al.
2024, "Discovering Temporally-Aware Reinforcement Learning Algorithms"). Import submodules
directly; this package imports nothing on purpose.
"""
