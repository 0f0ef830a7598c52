"""Semantic-Fusion Attention (SFA).

A stock cross-attention ``Transformer2DModel`` attends to the *content* prompt. SFA gives it two more
transformers (the official ``attentions_lowlevel`` / ``attentions_connect``):

* ``quality_transformer`` sees the same input ``h`` and cross-attends to the *quality* prompt;
* ``fusion_transformer`` takes the content branch's output as queries and the quality branch's output,
  flattened to H*W tokens of width C, as keys/values.

    sfa:          out = Fusion(T_c(h, c_content), tokens(T_q(h, c_quality)))      (the paper)
    sequential:   out = T_q(T_c(h, c_content), c_quality)
    content_only: out = T_c(h, c_content)                                         (stock model)
    quality_only: out = T_c(h, c_quality)

The swap keeps the pretrained transformer's own weights and keys; the new ones live under
``<path>.quality_transformer.*`` and ``<path>.fusion_transformer.*``. The quality embedding travels in
``cross_attention_kwargs[QUALITY_KEY]`` and is popped here, before the inner attention processors see it.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModel, Transformer2DModelOutput
from torch import nn

from xpsr.config import FUSION_MODES

QUALITY_KEY = "xpsr_quality_embeds"
_NEEDS_QUALITY = ("sfa", "sequential", "quality_only")


def _fresh_fusion(base: Transformer2DModel) -> Transformer2DModel:
    """A copy of ``base`` whose cross-attention keys/values read C-wide feature tokens, freshly initialised."""
    fusion = copy.deepcopy(base)
    channels = base.config.in_channels
    ref = base.proj_out.weight
    for block in fusion.transformer_blocks:
        attn = block.attn2
        if attn is None:
            raise ValueError("SFA needs a transformer with cross-attention (attn2)")
        for name in ("to_k", "to_v"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(channels, old.out_features, bias=old.bias is not None,
                                          device=ref.device, dtype=ref.dtype))
        attn.cross_attention_dim = channels
    return fusion


class SFATransformer2D(Transformer2DModel):
    """A ``Transformer2DModel`` with SFA branches; create it with :meth:`from_transformer`."""

    fusion_mode: str = "content_only"
    quality_transformer: Transformer2DModel | None
    fusion_transformer: Transformer2DModel | None

    @classmethod
    def from_transformer(cls, base: Transformer2DModel, mode: str) -> "SFATransformer2D":
        """Turn ``base`` into an SFA transformer in place (its weights and keys stay as they are).

        Quality and fusion transformers start as copies of the pretrained ``base`` (official init); the
        fusion's ``attn2.to_k/to_v`` take C inputs and start fresh.
        """
        if mode not in FUSION_MODES:
            raise ValueError(f"fusion mode {mode!r} is not one of {FUSION_MODES}")
        if isinstance(base, SFATransformer2D):
            raise ValueError("this transformer already carries SFA; inject once, on a freshly loaded model")
        if base.config.only_cross_attention:
            raise ValueError("SFA does not support only_cross_attention transformers")
        quality = copy.deepcopy(base) if mode in ("sfa", "sequential") else None
        fusion = _fresh_fusion(base) if mode == "sfa" else None
        # Re-class in place: no copy of the pretrained weights, the parent's state-dict keys are unchanged.
        base.__class__ = cls
        base.fusion_mode = mode
        base.quality_transformer = quality
        base.fusion_transformer = fusion
        return base

    def forward(  # noqa: D401 - same contract as Transformer2DModel.forward
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        class_labels: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        # The dict is shared by every block of the model: copy before popping.
        kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs else {}
        quality = kwargs.pop(QUALITY_KEY, None)
        mode = self.fusion_mode
        if quality is None and mode in _NEEDS_QUALITY:
            raise ValueError(
                f"fusion mode {mode!r} needs quality_embeds (embed an empty prompt rather than passing None)"
            )
        common = dict(timestep=timestep, added_cond_kwargs=added_cond_kwargs, class_labels=class_labels,
                      cross_attention_kwargs=kwargs or None, attention_mask=attention_mask, return_dict=False)

        if mode == "quality_only":
            out = super().forward(hidden_states, encoder_hidden_states=quality, **common)[0]
        else:
            content = super().forward(hidden_states, encoder_hidden_states=encoder_hidden_states,
                                      encoder_attention_mask=encoder_attention_mask, **common)[0]
            if mode == "content_only":
                out = content
            elif mode == "sequential":
                out = self.quality_transformer(content, encoder_hidden_states=quality, **common)[0]
            else:  # sfa: both branches read the same input, the fusion attends from content to quality
                low = self.quality_transformer(hidden_states, encoder_hidden_states=quality, **common)[0]
                tokens = low.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
                out = self.fusion_transformer(content, encoder_hidden_states=tokens, **common)[0]
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def cross_attention_transformers(model: nn.Module, part: str) -> Iterator[tuple[str, int, Transformer2DModel]]:
    """(block path, block index, transformer) for each cross-attention transformer in ``part``.

    ``part`` is ``down_blocks``, ``mid_block`` or ``up_blocks``; the mid block has index 0.
    """
    blocks = [getattr(model, part)] if part == "mid_block" else list(getattr(model, part, []))
    for index, block in enumerate(blocks):
        for j, attn in enumerate(getattr(block, "attentions", None) or []):
            if isinstance(attn, Transformer2DModel) and attn.transformer_blocks[0].attn2 is not None:
                yield f"{part}.{index}.attentions.{j}" if part != "mid_block" else f"mid_block.attentions.{j}", \
                    index, attn


def inject_sfa(
    model: nn.Module,
    mode: str,
    down_blocks: Iterable[int] | None = None,
    mid: bool = True,
    up_blocks: Iterable[int] = (),
) -> list[str]:
    """Put SFA into ``model`` (a ControlNet or UNet) and return the paths that got the full ``mode``.

    Every other cross-attention transformer of the model becomes ``content_only`` so that it pops the
    quality key too (it would otherwise reach the attention processors, which warn on every call).
    ``down_blocks=None`` means every cross-attention down block.
    """
    down = None if down_blocks is None else set(down_blocks)
    up = set(up_blocks)
    chosen = []
    for part in ("down_blocks", "mid_block", "up_blocks"):
        if getattr(model, part, None) is None:
            continue
        for path, index, attn in list(cross_attention_transformers(model, part)):
            selected = (
                (part == "down_blocks" and (down is None or index in down))
                or (part == "mid_block" and mid)
                or (part == "up_blocks" and index in up)
            )
            SFATransformer2D.from_transformer(attn, mode if selected else "content_only")
            if selected:
                chosen.append(path)
    model.xpsr_sfa = True  # read on every forward: a flag, not a walk over all modules
    return chosen


def has_sfa(model: nn.Module) -> bool:
    """Whether :func:`inject_sfa` ran on ``model`` (its forward then routes the quality embedding)."""
    return bool(getattr(model, "xpsr_sfa", False))
