"""Captions: prompt cache, captioners, the caption runner."""
