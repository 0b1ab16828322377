"""Training: setup, the one loop, the step, optimizers, checkpoints, events."""
