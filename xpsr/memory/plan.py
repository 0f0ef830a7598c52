"""`xpsr plan`: run the training or inference plan of a setting, check it against card sizes (with the
stated margin) and estimate step times on named GPUs; one summary on stdout, everything as JSON on request."""
from __future__ import annotations

import json
from pathlib import Path

from xpsr.config import PlanConfig
from xpsr.memory.gpus import GIB, Margin, estimates, fitting_cards


def run_plan(cfg: PlanConfig, with_costs: bool = True) -> dict:
    """The plan of ``cfg`` as a dict: peak bytes by category/module, the instant of the peak, which cards fit
    (with the margin), roofline step-time estimates (``with_costs``)."""
    if cfg.what == "train":
        from xpsr.memory.train_plan import plan_training

        result = plan_training(cfg.train, cfg.preset, with_costs=with_costs)
    else:
        from xpsr.memory.infer_plan import plan_inference

        result = plan_inference(cfg.infer, cfg.preset, cfg.output_size, with_costs=with_costs)
    margin = Margin(cfg.fragmentation, cfg.fixed_gib)
    costs = result.pop("costs", None)
    if costs is not None:
        result["estimated_seconds"] = estimates(costs)
        result["tflops"] = round(sum(c[0] for c in costs) / 1e12, 3)
        result["gbytes_moved"] = round(sum(c[1] for c in costs) / 1e9, 2)
    result["margin"] = {"fragmentation": margin.fragmentation, "fixed_gib": margin.fixed_gib,
                        "needed_gib": round(margin.needed_gib(result["peak_bytes"]), 2)}
    result["fits_gib"] = fitting_cards(result["peak_bytes"], margin, cfg.cards_gib)
    return result


def summary(result: dict) -> str:
    """A few lines for people: the peak, its parts, where it happens, the cards, the estimates."""
    gib = result["peak_bytes"] / GIB
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in result["by_category"].items())
    at, m = result["peak_at"], result["margin"]
    mods = ", ".join(f"{k} {v / GIB:.2f}" for k, v in list(result["by_module"].items())[:5])
    lines = [f"plan: {describe(result)}",
             f"  peak {gib:.2f} GiB of live tensors ({parts} GiB)",
             f"  at the {at['phase']} phase, op {at['op']} in {at['module'] or '(no module)'}",
             f"  largest modules at the peak: {mods} GiB",
             f"  needs {m['needed_gib']:.2f} GiB with the margin (x{1 + m['fragmentation']:.2f} + "
             f"{m['fixed_gib']} GiB); fits cards of {_cards(result['fits_gib'])} GiB"]
    if "estimated_seconds" in result:
        est = ", ".join(f"{k} {v:.3g} s" for k, v in result["estimated_seconds"].items())
        lines.append(f"  ESTIMATED time (roofline lower bound, {result['tflops']} TFLOP, {result['gbytes_moved']} GB "
                     f"moved): {est}")
    return "\n".join(lines)


def _cards(cards: list[float]) -> str:
    return ", ".join(f"{c:g}" for c in cards) if cards else "none of the sizes checked"


def describe(result: dict) -> str:
    """One line naming the setting of a plan."""
    if result["what"] == "train":
        keys = ("mixed_precision", "frozen_unet_dtype", "gradient_checkpointing", "use_8bit_adam", "latent_cache")
        extra = " ".join(f"{k}={str(result[k]).lower()}" for k in keys)
        return f"train {result['preset']} {result['resolution']} px x {result['batch_size']}, {extra}"
    return (f"infer {result['preset']} {result['output_size']} px {result['mode']} dtype={result['dtype']} "
            f"latent_tile={result['latent_tile']} vae_decoder_tile={result['vae_decoder_tile']}")


def cmd_plan(cfg: PlanConfig) -> int:
    """`xpsr plan`: print the summary (and write JSON with ``output``); with ``free_gib``, exit 1 when the plan
    does not fit that much memory."""
    result = run_plan(cfg)
    print(summary(result))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=2))
    if cfg.free_gib is not None:
        from xpsr.memory.fit import check_fits

        check_fits(result, cfg.free_gib, Margin(cfg.fragmentation, cfg.fixed_gib))
        print(f"  fits {cfg.free_gib:g} GiB free")
    return 0
