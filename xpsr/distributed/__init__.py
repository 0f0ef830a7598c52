"""Helpers for training and running on several processes (accelerate over torch.distributed)."""
