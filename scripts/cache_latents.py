#!/usr/bin/env python
"""VAE posterior moments of the HR images of the training pairs, once, for `data.latent_cache` (no VAE encoder
in the training step). Reads the same config as `xpsr train`: model.base, data.pairs, data.latent_cache.

    python scripts/cache_latents.py --config configs/train/xpsr_sd15_12gb.yaml data.pairs=[PAIRS] data.latent_cache=DIR
"""
import sys

from xpsr.training.latent_cache import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
