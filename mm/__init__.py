"""Composition, stages, the training loop, configs, checkpoints, metrics and the `mm` CLI."""
