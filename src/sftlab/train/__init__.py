"""Training: loss, optimizer, the one loop, checkpoints, metrics."""
