"""The trainable set of a recipe: only what its loss can reach.

DDP all-reduces a gradient for every parameter that requires one, and waits for each of them; a parameter
the loss never reaches (a DFC head whose term the recipe switches off) never gets one, and the second step
dies with "Expected to have finished reduction in the prior iteration". ``find_unused_parameters=True``
would hide that at the price of a graph walk every step. Instead the heads a recipe switches off are frozen
and left out of the optimizer: they keep their initial weights (still saved, so every weights file has the
same keys whatever the recipe) and the graph is static, which is what DDP and FSDP expect.
"""
from __future__ import annotations

from torch import nn

from xpsr.config import DFCConfig


def residual_levels(controlnet_config) -> list[int]:
    """Downsampling level (0 = latent size) of each ControlNet down residual, in order, then the mid one."""
    n = len(controlnet_config.block_out_channels)
    levels = [0]
    for i in range(n):
        levels += [i] * controlnet_config.layers_per_block
        if i < n - 1:
            levels.append(i + 1)  # the downsampler's output is already at the next level
    return levels + [n - 1]


def paper_head_indices(controlnet_config, n_scales: int = 3) -> list[int]:
    """Latent heads used by ``dfc.latent_scales=paper``: the first residual at each of the ``n_scales`` finest
    levels (the rule of :func:`xpsr.training.step.paper_latent_indices`, computed from the config)."""
    chosen, seen = [], set()
    for i, level in enumerate(residual_levels(controlnet_config)):
        if level not in seen:
            seen.add(level)
            if len(seen) <= n_scales:
                chosen.append(i)
    return chosen


def unreachable_heads(controlnet: nn.Module, dfc: DFCConfig) -> list[str]:
    """``controlnet.*`` names of the DFC head parameters no loss term of ``dfc`` reads."""
    names = []
    off = dfc.weight == 0
    if getattr(controlnet.controlnet_cond_embedding, "to_rgbs", None) is not None and (off or not dfc.pixel):
        names += [f"controlnet.controlnet_cond_embedding.to_rgbs.{n}"
                  for n, _ in controlnet.controlnet_cond_embedding.to_rgbs.named_parameters()]
    heads = getattr(controlnet, "dfc_latent_heads", None)
    if heads is not None:
        all_heads = [*heads, controlnet.dfc_latent_head_mid]
        used = set() if off or not dfc.latent else (
            set(paper_head_indices(controlnet.config)) if dfc.latent_scales == "paper" else set(range(len(all_heads))))
        for i, head in enumerate(all_heads):
            if i in used:
                continue
            prefix = f"dfc_latent_heads.{i}" if i < len(heads) else "dfc_latent_head_mid"
            names += [f"controlnet.{prefix}.{n}" for n, _ in head.named_parameters()]
    return names


def reachable_only(trainable: dict[str, nn.Parameter], controlnet: nn.Module,
                   dfc: DFCConfig) -> dict[str, nn.Parameter]:
    """``trainable`` without the heads ``dfc`` switches off; those are frozen (``requires_grad=False``)."""
    off = set(unreachable_heads(controlnet, dfc))
    for name in off:
        trainable[name].requires_grad_(False)
    return {k: p for k, p in trainable.items() if k not in off}
