"""Prompt encoding with the frozen CLIP text encoder: each distinct prompt of a batch is encoded once."""
from __future__ import annotations

import torch


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None) -> torch.Tensor:
    """(len(prompts), 77, D) embeddings on ``device`` (default: the text encoder's); duplicates (often many ""
    or repeated captions) share one pass. The encoder runs where its weights are, so a text encoder kept on the
    CPU (training's ``text_encoder_device=cpu``) serves a model on the GPU."""
    unique = list(dict.fromkeys(prompts))
    ids = tokenizer(unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    embeds = text_encoder(ids.to(next(text_encoder.parameters()).device))[0]
    index = torch.tensor([unique.index(p) for p in prompts], device=embeds.device)
    embeds = embeds.index_select(0, index)
    return embeds if device is None else embeds.to(device)
