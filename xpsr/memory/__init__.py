"""GPU memory plans counted without a GPU: our training step and sampler on fake tensors (`xpsr plan`), the
fit check before the first step, and their validation against the CPU allocator (docs/gpu-memory.md)."""
