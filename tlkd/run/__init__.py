"""Run directories: atomic files, metrics, weights, checkpoints and plots."""
