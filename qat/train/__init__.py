"""Training loop, evaluation, optimizers and checkpoints."""
