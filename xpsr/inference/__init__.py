"""Inference: the XPSR pipeline (also used by validation during training), tiling, colour fix, folder runner."""
