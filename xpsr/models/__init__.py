"""XPSR model parts, added to stock diffusers modules after loading (no forked diffusers files)."""
