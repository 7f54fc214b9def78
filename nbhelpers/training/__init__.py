"""Training: configuration, the loop with checkpoints, runs, losses."""
