"""The ``tiny`` preset: every Stable Diffusion part at a few-MB size, random weights, built in code.

It has SD's structure (3 cross-attention levels -> here 2 + a plain level, 8x VAE, CLIP text encoder,
CLIP-style BPE tokenizer) so tests, CI and the CPU demo exercise the real code paths offline.
"""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
# The demo's prior (xpsr/training/prior.py pre-trains these on the bundled photos): a VAE with 4x spatial
# compression (3 blocks; 8x with 4 channels cannot be taught to reconstruct photos in CPU minutes) and the
# tiny UNet on its latents. Its conditioning embedding needs 2 stride-2 stages: 3 conditioning_channels.
DEMO_VAE = dict(TINY_VAE, latent_channels=8, block_out_channels=(16, 32, 32),
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
DEMO_UNET = dict(TINY_UNET, sample_size=16, in_channels=8, out_channels=8)
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, steps_offset=1, prediction_type="epsilon")

# A small corpus for the offline BPE tokenizer: words that show up in content and quality captions.
_WORDS = """a an the of and with in on at to is are this image photo picture shows view close up scene
person man woman child people face hair eyes hand dog cat bird horse animal tree trees grass flower plant
sky cloud clouds sun water sea river lake beach mountain rock road street car building house city window
wall door room table chair food fruit plate cup red green blue yellow white black brown gray orange dark
light bright colorful small large old young standing sitting walking front background foreground quality
low high good poor clear blurry blur sharp noise noisy grain jpeg compression artifacts blocky detail
details texture textures color colors colour lighting exposure contrast saturation overall resolution
slightly very heavily moderately somewhat visible fine edges soft smooth""".split()


TINY_MERGES = 400  # enough for every word of _WORDS to become one token (348 merges)


def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of the tiny CLIP tokenizer, laid out as CLIP's: the 256 byte symbols, the same with
    ``</w>``, the learnt merges, then ``<|startoftext|>`` and ``<|endoftext|>``. Pure Python, so the ids are
    the same in every process (see xpsr.models.tiny_bpe)."""
    from xpsr.models.tiny_bpe import build_vocab, byte_alphabet, byte_encode, learn_merges

    merges = learn_merges((byte_encode(w.lower()) for w in _WORDS), TINY_MERGES, end_of_word="</w>",
                          min_frequency=1)
    alphabet = byte_alphabet()
    vocab = build_vocab(alphabet + [a + "</w>" for a in alphabet], merges, ["<|startoftext|>", "<|endoftext|>"])
    return vocab, merges


@functools.lru_cache(maxsize=1)
def build_tiny_tokenizer():
    """A CLIP tokenizer over the tiny vocabulary above, offline. Any text tokenizes (every byte has a
    symbol); each word of the list above is one token."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_clip_vocab()
    with tempfile.TemporaryDirectory() as d:
        Path(d, "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
        Path(d, "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(d, model_max_length=77)


def build_tiny_base(seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler of the tiny preset (deterministic for a seed)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
            "scheduler": DDPMScheduler(**SD_SCHEDULER)}
