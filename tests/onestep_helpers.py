"""Shared set-up of the one-step tests: the tiny recipe's config, model and a synthetic batch."""
from __future__ import annotations

import torch
from conftest import REPO

RECIPE = REPO / "configs" / "train" / "onestep_tiny.yaml"
TEACHER_INFER = REPO / "configs" / "infer" / "onestep_tiny_teacher.yaml"
TERMS = ("regression", "lpips", "dfc", "distill", "vsd")


def onestep_config(out, *overrides):
    from xpsr.config import TrainConfig, load_config

    return load_config(TrainConfig, RECIPE, [f"output_dir={out}", f"onestep.teacher_infer_config={TEACHER_INFER}",
                                             "report_to=none", *overrides])


def only(term: str) -> list[str]:
    """Overrides that switch every loss term off but ``term``."""
    return [f"onestep.{t}_weight={1.0 if t == term else 0.0}" for t in TERMS]


def build(out, *overrides):
    from xpsr.onestep.train import build_onestep, build_teacher

    cfg = onestep_config(out, *overrides)
    modules = build_teacher(cfg)
    parts, trainable, groups = build_onestep(cfg, modules, out, torch.device("cpu"))
    return cfg, modules, parts, trainable, groups


def batch(seed: int = 0, size: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    hr, lr_cond = torch.rand(2, 3, size, size, generator=g) * 2 - 1, torch.rand(2, 3, size, size, generator=g)
    return {"hr": hr, "lr_cond": lr_cond, "content_prompt": ["a cat", "a house"], "quality_prompt": ["blurry", "noisy"]}
