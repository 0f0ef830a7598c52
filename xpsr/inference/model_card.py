"""The model card (``README.md``) parts every written XPSR folder shares: what the model is and how to load it.
``XPSRPipeline.save_pretrained`` / ``push_to_hub`` write :func:`pipeline_card`; ``xpsr export`` adds what the
weights were trained on. The loading snippet names the Hub id or the folder by a relative name, never the
absolute path of the machine that wrote it.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

TAGS = ["super-resolution", "image-super-resolution", "xpsr", "controlnet", "stable-diffusion", "diffusers"]


def card_location(output: str | Path, repo_id: str | None) -> str:
    """Where the card's snippet loads the model from: the Hub id, or the folder by its name relative to where
    it is used; never the absolute path of the machine that wrote it."""
    return repo_id or f"./{Path(output).name}"


def card_head(meta: dict[str, Any], model_config, written_by: str) -> list[str]:
    return ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
            "# XPSR super-resolution model", "",
            "XPSR (Qu et al., ECCV 2024, arXiv:2403.05049): Stable Diffusion with a ControlNet carrying "
            "Semantic-Fusion Attention over a content and a quality prompt, pixel-aware attention in the UNet "
            f"decoder and degradation-free-constraint heads. Written by {written_by} for the `xpsr` package.", "",
            f"Model settings: `{json.dumps(dataclasses.asdict(model_config), sort_keys=True)}`", ""]


def usage_lines(where: str) -> list[str]:
    return ["## Use", "", "```python", "from xpsr import XPSRPipeline", "",
            f'pipe = XPSRPipeline.from_pretrained("{where}")',
            'sr = pipe("lr.png", prompt="a cat on a sofa").images[0]  # x4; quality prompt: heuristic',
            "```", "",
            "Through diffusers' own loader, from a local copy of this folder (it runs the folder's `pipeline.py`, "
            "which only imports the installed `xpsr`):", "",
            "```python", "from diffusers import DiffusionPipeline", "",
            'pipe = DiffusionPipeline.from_pretrained(FOLDER, custom_pipeline=FOLDER, trust_remote_code=True)',
            "```", ""]


def pipeline_card(model_config, where: str) -> str:
    """README.md of a folder ``XPSRPipeline.save_pretrained`` / ``push_to_hub`` writes (no training record:
    ``xpsr export`` writes the full card over it); ``where`` is the Hub id or a relative folder."""
    meta = {"pipeline_tag": "image-to-image", "library_name": "diffusers", "tags": list(TAGS)}
    return "\n".join(card_head(meta, model_config, "`XPSRPipeline.save_pretrained`") + usage_lines(where))
