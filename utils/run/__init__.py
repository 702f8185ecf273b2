"""Running: run files and flags, the stage CLI, ablation grids, compute placement, processes and signals."""
