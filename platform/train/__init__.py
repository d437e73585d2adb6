"""One training run on Ray Train: the driver, the TorchTrainer, the per-worker loop, checkpoints and the
optimiser recipe."""
