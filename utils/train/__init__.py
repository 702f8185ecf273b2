"""Training: the one training loop and its sharded, resumable checkpoints."""
