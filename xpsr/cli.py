"""``xpsr SUBCOMMAND [--config FILE] [key=value ...]`` -- one subcommand per stage.

Every subcommand reads one config schema (xpsr/config/); ``xpsr SUBCOMMAND --help`` lists its keys.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from xpsr.config import (
    BenchConfig,
    CaptionConfig,
    CaptionExportConfig,
    CaptionImportConfig,
    CaptionMergeConfig,
    CaptionRepairConfig,
    ConfigError,
    DemoConfig,
    EvalConfig,
    ExportConfig,
    InferConfig,
    PlanConfig,
    PrepareConfig,
    ServeConfig,
    TablesConfig,
    TrainConfig,
    describe,
    load_config,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def cmd_demo(cfg: DemoConfig) -> int:
    """The whole pipeline on bundled photos with the tiny model; writes report.html."""
    from xpsr.apps.demo import run_demo

    run_demo(cfg)  # prints the model summary once its prior exists
    return 0


def cmd_bench(cfg: BenchConfig) -> int:
    """Time one training step; JSON on stdout."""
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        if cfg.what == "data":
            from xpsr.apps.bench_data import run_data_bench

            result = run_data_bench(cfg)
        elif cfg.what == "flops":
            from xpsr.apps.bench import run_flops_bench

            result = run_flops_bench(cfg)
        elif cfg.what == "infer":
            from xpsr.apps.bench import run_infer_bench

            result = run_infer_bench(cfg)
        else:
            from xpsr.apps.bench import run_bench

            result = run_bench(cfg)
    print(json.dumps(result, indent=2))
    return 0


def cmd_prepare(cfg: PrepareConfig) -> int:
    """HR folders (or an existing paired set, or videos with video.clips=true) -> hr/, lr/, manifest.jsonl,
    report.json."""
    if cfg.video.clips:  # clips of video frames: one degradation per clip, then a real codec (docs/video.md)
        from xpsr.video.training_data import prepare_clips

        prepare_clips(cfg)
        return 0
    from xpsr.data.pairs import prepare_pairs

    prepare_pairs(cfg)
    return 0


def cmd_train(cfg: TrainConfig) -> int:
    """Train XPSR (a non-finite loss or a data/model problem ends it with a readable message)."""
    from xpsr.memory.fit import guard_training
    from xpsr.training.loop import run_training

    with guard_training(cfg):  # on CUDA: the plan against free memory first; an OOM reported in one line
        summary = run_training(cfg)
    print(f"train: {summary['steps']} steps in {summary['seconds']}s ({summary['steps_per_s']} steps/s), "
          f"last losses {summary['last']}")
    return 0


def cmd_infer(cfg: InferConfig) -> int:
    from xpsr.inference.run import run_inference
    from xpsr.memory.fit import check_inference_memory, guard_inference

    with guard_inference(cfg):  # the plan against free memory first (CUDA); an OOM as one line
        report = run_inference(cfg, before_first_image=check_inference_memory)
    return 1 if report["errors"] and not report["done"] else 0


def cmd_export(cfg: ExportConfig) -> int:
    """Weights -> a diffusers folder (model_index.json, components, model card) for XPSRPipeline."""
    from xpsr.apps.export import export_model

    out = export_model(cfg)
    pushed = f", pushed to {cfg.push_to_hub}" if cfg.push_to_hub else ""
    print(f"export: {out} (load with XPSRPipeline.from_pretrained({str(out)!r})){pushed}")
    return 0


def cmd_eval(cfg: EvalConfig) -> int:
    from xpsr.metrics.evaluate import evaluate

    evaluate(cfg)
    return 0


def cmd_tables(cfg: TablesConfig) -> int:
    from xpsr.metrics.tables import NoPlotData, compare_table, pd_scatter

    if not cfg.runs:
        print("xpsr tables: give runs.LABEL=EVAL_DIR for each run", file=sys.stderr)
        return 1  # a config problem: exit 1 as every other one (README: Command line)
    dataset = cfg.dataset if cfg.compare == "paper" else None
    if cfg.compare == "paper" and not dataset:
        print("xpsr tables: compare=paper needs dataset=DIV2K-Val|RealSR|DRealSR", file=sys.stderr)
        return 1
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(dict(cfg.runs), list(cfg.metrics), dataset)
    (out / "table.md").write_text(table)
    print(table)
    written = [out / "table.md"]
    try:
        written.append(pd_scatter(dict(cfg.runs), out / "pd_scatter.png", cfg.distortion, cfg.perception))
    except NoPlotData as e:  # an empty plot would look like a result
        print(f"tables: no perception-distortion plot ({e})")
    if cfg.visual_images > 0:
        from xpsr.metrics.visual import NoVisualData, visual_comparison

        try:
            written.append(visual_comparison(dict(cfg.runs), out / "visual.png", cfg.visual_images,
                                             cfg.visual_crop, cfg.perception))
        except NoVisualData as e:
            print(f"tables: no visual comparison ({e})")
    print("tables: " + ", ".join(str(p) for p in written))
    return 0


def cmd_caption(cfg: CaptionConfig) -> int:
    from xpsr.captions.run import run_captioning

    run_captioning(cfg)
    return 0


def cmd_caption_export(cfg: CaptionExportConfig) -> int:
    from xpsr.captions.cache import PromptCache

    if not Path(cfg.cache).is_file():
        print(f"xpsr caption-export: cache {cfg.cache} does not exist", file=sys.stderr)
        return 1
    with PromptCache(cfg.cache) as cache:
        n = cache.export_jsonl(cfg.output)
    print(f"caption-export: {n} rows -> {cfg.output}")
    return 0


def cmd_caption_repair(cfg: CaptionRepairConfig) -> int:
    """Readable rows of a damaged cache -> a new cache or JSONL; says how many rows were lost."""
    from xpsr.captions.repair import repair_cache

    result = repair_cache(cfg.cache, cfg.output)
    lost = result.unreadable + result.invalid
    print(f"caption-repair: {len(result.rows)} rows -> {cfg.output}; {result.unreadable} unreadable and "
          f"{result.invalid} invalid rows skipped" + "".join(f"\n  {note}" for note in result.notes))
    if lost or not result.full_scan:
        print(f"caption-repair: replace the damaged cache with {cfg.output} once you have checked it, then rerun "
              "`xpsr caption` to caption the images whose rows were lost")
    return 0


def cmd_caption_merge(cfg: CaptionMergeConfig) -> int:
    """Per-rank cache shards (multi-process `xpsr caption`) -> the cache; safe to repeat and to interrupt."""
    from xpsr.captions.shards import merge_shards, shard_dir

    r = merge_shards(cfg.cache, kind=cfg.kind, timeout_s=cfg.timeout_s)
    print(f"caption-merge: {r.shards} shards from {shard_dir(cfg.cache)}, {r.rows} rows: {r.inserted} new, "
          f"{r.replaced} replaced by newer, {r.rows - r.inserted - r.replaced} already there -> {cfg.cache}"
          + "".join(f"\n  damaged shard, its readable rows merged, set aside as .damaged: {d}" for d in r.damaged))
    return 0


def cmd_caption_import(cfg: CaptionImportConfig) -> int:
    from xpsr.captions.cache import PromptCache

    if not (cfg.jsonl or cfg.official_lr):
        print("xpsr caption-import: give jsonl=FILE or official_lr=DIR", file=sys.stderr)
        return 1
    with PromptCache(cfg.cache) as cache:
        n = cache.import_jsonl(cfg.jsonl) if cfg.jsonl else 0
        n += cache.import_official(cfg.official_lr) if cfg.official_lr else 0
    print(f"caption-import: {n} new rows in {cfg.cache}")
    return 0


def cmd_plan(cfg) -> int:
    """GPU memory plan of a training step or a super-resolution, counted on fake tensors (no GPU)."""
    from xpsr.memory.plan import cmd_plan as run

    return run(cfg)


def cmd_serve(cfg: ServeConfig) -> int:
    """The web app; needs the `app` extra (pip install -e ".[app]")."""
    try:
        from xpsr.apps.serve.app import serve
    except ImportError as e:
        print(f"xpsr serve: the web app needs Gradio: pip install -e \".[app]\" ({e})", file=sys.stderr)
        return 1
    try:
        serve(cfg)
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f"xpsr serve: cannot listen on {cfg.host}:{cfg.port} ({e})", file=sys.stderr)
        return 1
    return 0


COMMANDS: dict[str, tuple[type, Callable, str]] = {
    "prepare": (PrepareConfig, cmd_prepare, "make LR/HR pairs with the Real-ESRGAN degradation"),
    "train": (TrainConfig, cmd_train, "train XPSR (use `accelerate launch scripts/train.py` for several GPUs)"),
    "infer": (InferConfig, cmd_infer, "super-resolve an image or a folder"),
    "eval": (EvalConfig, cmd_eval, "metrics of an SR folder against an HR folder"),
    "tables": (TablesConfig, cmd_tables,
               "ablation/paper tables, a perception-distortion plot and side-by-side crops from eval folders"),
    "caption": (CaptionConfig, cmd_caption, "write content or quality prompts into the prompt cache"),
    "caption-export": (CaptionExportConfig, cmd_caption_export, "prompt cache -> JSONL"),
    "caption-repair": (CaptionRepairConfig, cmd_caption_repair,
                       "damaged prompt cache -> its readable rows in a new cache or JSONL"),
    "caption-merge": (CaptionMergeConfig, cmd_caption_merge,
                      "per-rank cache shards of a multi-process `xpsr caption` -> the cache (idempotent)"),
    "caption-import": (CaptionImportConfig, cmd_caption_import, "JSONL or the official prompt folders -> cache"),
    "demo": (DemoConfig, cmd_demo, "pairs -> prompts -> train -> SR -> metrics -> report.html, tiny model, CPU"),
    "bench": (BenchConfig, cmd_bench, "time one training step (JSON on stdout)"),
    "serve": (ServeConfig, cmd_serve, "a web app (Gradio): upload an image, get it super-resolved"),
    "plan": (PlanConfig, cmd_plan, "GPU memory plan (peak by category and module, cards, time estimates)"),
    "export": (ExportConfig, cmd_export, "weights -> a diffusers folder with a model card, for XPSRPipeline"),
}


@functools.cache
def _help_epilog(schema: type) -> str:
    rows = describe(schema)
    width = max(len(k) for k, _, _ in rows)
    return "config keys (override with key=value):\n" + "\n".join(
        f"  {k:<{width}}  default {d!r:<12} {text}" for k, d, text in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xpsr", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (schema, _, help_text) in COMMANDS.items():
        # no abbreviations: `--c=0` must not silently mean `--config=0`
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_help_epilog(schema),
                           formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        p.add_argument("--config", help="YAML file with keys of this subcommand")
        p.add_argument("overrides", nargs="*", help="key=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    schema, fn, _ = COMMANDS[args.command]
    try:
        cfg = load_config(schema, args.config, args.overrides)
    except ConfigError as e:  # exit 1 with one line, as every other problem with the user's input
        print(f"xpsr {args.command}: {e}", file=sys.stderr)
        return 1
    from xpsr.apps.quiet_imports import hide_bitsandbytes, needs_bitsandbytes, show_bitsandbytes
    from xpsr.errors import XPSRError

    # keeps bitsandbytes' offline kernel-download warning out of the commands that never use it
    hidden = not needs_bitsandbytes(args.command, cfg) and hide_bitsandbytes()
    try:
        return fn(cfg)
    except (XPSRError, FileNotFoundError, ValueError, KeyError) as e:  # problems with inputs, not bugs
        print(f"xpsr {args.command}: {e}", file=sys.stderr)
        return 1
    finally:
        if hidden:
            show_bitsandbytes()


if __name__ == "__main__":
    sys.exit(main())
