"""`xpsr export`: our checkpoints or the official release -> a diffusers folder for ``XPSRPipeline``, with a
model card (``README.md`` with the Hub's YAML metadata) saying what the weights are, what they were
trained on and which commands reproduce them. Pushing to the Hub is one ``upload_folder`` call.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from xpsr.config import ExportConfig, InferConfig
from xpsr.inference.model_card import TAGS, card_head, card_location, usage_lines
from xpsr.models.hub import HubPushError, push_folder  # noqa: F401 - re-exported (export API)

TRAIN_CONFIG_FILE = "xpsr_train_config.yaml"  # the stored training config, copied beside the weights


@dataclasses.dataclass
class Source:
    """What ``weights=`` points at: the path to load and what we know about how it was made."""

    kind: str  # "trained" | "official" | "exported"
    path: Path
    train_config: dict | None = None  # the resolved TrainConfig stored in our checkpoints
    step: int | None = None
    run_dir: Path | None = None


def resolve_source(weights: str | Path) -> Source:
    """Classify ``weights``: run dir, checkpoint folder, trained file, exported folder or official folder."""
    from xpsr.models.checkpoint import read_config

    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"weights={path} does not exist")
    if path.is_dir() and (path / "final" / "trained.safetensors").is_file():
        path = path / "final" / "trained.safetensors"
    elif path.is_dir() and (path / "trained.safetensors").is_file():
        path = path / "trained.safetensors"
    if path.is_file():
        config = read_config(path)
        step = None
        state = path.parent / "state.json"
        if state.is_file():  # checkpoints/step-N
            step = int(json.loads(state.read_text())["step"])
        elif path.parent.name == "final":
            step = config.get("max_steps")
        run_dir = path.parent.parent.parent if state.is_file() else path.parent.parent
        return Source("trained", path, config, step, run_dir if (run_dir / "config.yaml").is_file() else None)
    if (path / "checkpoints").is_dir():
        steps = sorted(p.name for p in (path / "checkpoints").glob("step-*"))
        raise FileNotFoundError(f"run {path} has no final/trained.safetensors (training did not finish); pass a "
                                f"checkpoint, e.g. weights={path / 'checkpoints' / (steps[-1] if steps else 'step-N')}")
    controlnet_config = path / "controlnet" / "config.json"
    if controlnet_config.is_file() and "xpsr" in json.loads(controlnet_config.read_text()):
        return Source("exported", path)
    return Source("official", path)


def check_parts_fit(modules, base: str) -> None:
    """The base model's text encoder and VAE must match the UNet the weights define."""
    width = modules.text_encoder.config.hidden_size
    if width != modules.unet.config.cross_attention_dim:
        raise ValueError(f"model.base={base!r}: its text encoder is {width} wide, but the weights' UNet cross-attends "
                         f"to {modules.unet.config.cross_attention_dim}; pass the base model the weights were "
                         "trained on (e.g. SD 1.5: 768, SD 2.1: 1024)")
    if modules.vae.config.latent_channels != modules.unet.config.in_channels:
        raise ValueError(f"model.base={base!r}: its VAE has {modules.vae.config.latent_channels} latent channels, "
                         f"the weights' UNet takes {modules.unet.config.in_channels}")


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def card_metadata(cfg: ExportConfig) -> dict[str, Any]:
    """The YAML front matter of the model card."""
    base_model = cfg.base_model or (cfg.model.base if _is_hub_id(cfg.model.base) else None)
    license_id = cfg.license or ("apache-2.0" if cfg.model.base == "tiny" else "other")
    meta: dict[str, Any] = {"license": license_id}
    if base_model:
        meta["base_model"] = base_model
    meta.update({"pipeline_tag": "image-to-image", "library_name": "diffusers", "tags": list(TAGS)})
    return meta


def _pairs_line(folder: str) -> str:
    manifest = Path(folder) / "manifest.jsonl"
    if manifest.is_file():
        with open(manifest) as f:
            n = sum(1 for line in f if line.strip())
        return f"- `{folder}`: {n} LR/HR pairs (its `manifest.jsonl` records each source image and degradation)"
    return f"- `{folder}` (not on this machine at export time)"


def _training_section(source: Source, cfg: ExportConfig) -> list[str]:
    train = source.train_config or {}
    data, model = train.get("data", {}), train.get("model", {})
    lines = ["## Training", ""]
    if train.get("demo_data"):
        lines.append("Trained on the demo set: crops of scikit-image's bundled sample photos, degraded by "
                     "`xpsr prepare` (Real-ESRGAN model), with heuristic quality prompts (`demo_data: true`).")
    else:
        lines.append("Trained on these pair folders (written by `xpsr prepare`):")
        lines += [_pairs_line(p) for p in data.get("pairs", [])] or ["- (none recorded)"]
    lines += ["", f"- prompts: `{data.get('cache')}` (content prompt: {train.get('content_prompt', 'caption')})",
              f"- steps: {source.step if source.step is not None else 'unknown'} of {train.get('max_steps')}, "
              f"batch {train.get('batch_size')} x accumulation {train.get('gradient_accumulation_steps')} per "
              f"process, learning rate {train.get('learning_rate')}, precision {train.get('mixed_precision')}, "
              f"seed {train.get('seed')}",
              f"- model: base `{cfg.model.base}`, fusion mode `{model.get('fusion_mode')}`, "
              f"DFC weight {train.get('dfc', {}).get('weight')}",
              f"- weights: `{source.path}`", ""]
    if source.run_dir is not None and (source.run_dir / "environment.json").is_file():
        env = json.loads((source.run_dir / "environment.json").read_text())
        lines += [f"Code: xpsr at git commit `{env.get('git_commit')}`, torch {env.get('torch')}, diffusers "
                  f"{env.get('diffusers')}.", ""]
    base = "" if cfg.model.base == "tiny" else f" model.base={cfg.model.base}"
    lines += ["To reproduce (the training config is in this folder as `" + TRAIN_CONFIG_FILE + "`):", "", "```bash",
              f"xpsr train --config {TRAIN_CONFIG_FILE} output_dir=runs/reproduce{base}",
              f"xpsr export weights=runs/reproduce output=OUT{base}", "```", ""]
    return lines


def model_card(source: Source, cfg: ExportConfig, model_config) -> str:
    """README.md: YAML metadata, what the model is, how to load it, what it was trained on, how to redo it."""
    meta = card_metadata(cfg)
    lines = card_head(meta, model_config, "`xpsr export`")
    if cfg.model.base == "tiny":
        lines += ["Base: the `tiny` preset (random weights built in code, a few MB): a model for tests and demos, "
                  "not for real photos.", ""]
    if meta["license"] == "other":
        lines += [f"Licence: the weights build on `{cfg.model.base}`; its licence applies (set the card's "
                  "`license` with `xpsr export license=...`).", ""]
    lines += usage_lines(card_location(cfg.output, cfg.push_to_hub))
    if source.kind == "trained":
        lines += _training_section(source, cfg)
    elif source.kind == "official":
        lines += ["## Training", "",
                  "Imported from the official XPSR release (github.com/qyp2000/XPSR), trained by its authors with "
                  "their `configs/xpsr.yaml` on Real-ESRGAN-degraded pairs; the repository does not name the "
                  "training images (see the paper). Imported and checked key by key by `xpsr.models.official`.",
                  "", "To reproduce this folder:", "", "```bash",
                  f"xpsr export weights={source.path} output=OUT model.base={cfg.model.base}", "```", ""]
    else:
        lines += ["## Training", "", f"Re-exported from the XPSR folder `{source.path}` (no training record).", ""]
    return "\n".join(lines)


def onestep_card_section(student) -> str:
    """The model card's words on a one-step student: how it runs (by default, with the recorded settings)."""
    return ("\n## One-step student (experimental, beyond the XPSR paper)\n\nThe UNet has the student's LoRA merged "
            f"in. It was trained to run in one step at t* = {student.onestep_timestep} from the LR latent's posterior "
            f"{student.lr_latent} (`lr_latent={student.lr_latent}`). `unet/config.json` records both (its "
            "`xpsr_onestep` entry), and `pipe(image)` and `xpsr infer weights=THIS_FOLDER` use them by default. The "
            "multi-step sampler is refused on these weights (`multistep_on_student=true` overrides).\n")


def export_model(cfg: ExportConfig) -> Path:
    """Write the diffusers folder for ``cfg.weights`` to ``cfg.output``; push it if ``cfg.push_to_hub``."""
    from xpsr.inference.diffusers_pipeline import XPSRPipeline
    from xpsr.inference.run import load_modules
    from xpsr.inference.trained_settings import settings_of
    from xpsr.onestep.lora import has_student, merge_lora

    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output={out} is a file")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise ValueError(f"output={out} already has files; choose an empty folder or pass overwrite=true")
    source = resolve_source(cfg.weights)
    weights = source.path if source.kind == "trained" else Path(cfg.weights)
    modules = load_modules(InferConfig(input="-", output_dir="-", model=cfg.model, weights=str(weights)))
    check_parts_fit(modules, cfg.model.base)
    student = settings_of(modules)
    if has_student(modules.unet) or cfg.merge_lora:
        if not cfg.merge_lora:
            raise ValueError(f"weights={cfg.weights} are a one-step student: pass merge_lora=true to fold its LoRA "
                             "into the UNet (its adapter in peft's layout is in the run's final/student_lora/)")
        merge_lora(modules.unet)  # raises when the weights carry no student adapter
    pipe = XPSRPipeline.from_modules(modules)
    pipe.save_pretrained(out)  # a student's settings go into unet/config.json (xpsr_onestep)
    if source.train_config is not None:
        (out / TRAIN_CONFIG_FILE).write_text(yaml.safe_dump(source.train_config, sort_keys=False))
    card = model_card(source, cfg, modules.config)
    if student.is_student:
        card += onestep_card_section(student)
    (out / "README.md").write_text(card)
    if cfg.push_to_hub:
        push_folder(out, cfg.push_to_hub)
    return out
