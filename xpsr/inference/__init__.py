"""Inference: sampling loop (shared with validation)."""
