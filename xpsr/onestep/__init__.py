"""One-step XPSR (experimental, beyond the paper): a LoRA student distilled from the multi-step XPSR sampler."""
