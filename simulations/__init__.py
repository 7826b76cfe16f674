"""Simulation tooling: the in-process runner, sweeps, plots and reproduction configs."""
