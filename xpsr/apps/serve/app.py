"""`xpsr serve`: the Gradio page over :class:`xpsr.apps.serve.engine.Engine`.

Upload an image; its quality prompt comes from the offline heuristic and its content prompt from the
configured captioner (both editable). Controls: steps, guidance, seed, colour fix, upscale, tiling. Shown:
a before/after slider, the prompts used, time and peak memory, and the PNG to download. A video section takes a
short clip (its first ``max_video_frames`` frames, the same controls) and shows the SR clip and before/after
frames. Requests run one at a time (queue of concurrency 1), so two uploads never run the model at once.
"""
from __future__ import annotations

import functools
import os
import tempfile
import traceback
from pathlib import Path

# No telemetry and no version check: the app must start and run with no network (set before importing gradio).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from xpsr.apps.serve.engine import Engine, RequestError, check_upload, parse_controls, size_limits  # noqa: E402
from xpsr.config import ServeConfig  # noqa: E402
from xpsr.errors import XPSRError  # noqa: E402

# System fonts only: the default theme would fetch its fonts from a CDN.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])


def _upload_path(payload, what: str = "an image") -> tuple[str, str]:
    """(server path, original name) of an upload as the raw Gradio payload (events run with preprocess=False,
    so that every file, readable or not, reaches our own decoding and its messages)."""
    if not payload:
        raise RequestError(f"upload {what} first")
    if isinstance(payload, str):
        return payload, Path(payload).name
    path = payload.get("path")
    if not path:
        raise RequestError(f"upload {what} first")
    return path, payload.get("orig_name") or Path(path).name


def _readable(fn):
    """Run ``fn``; any failure becomes a gr.Error whose message is shown in the page (never a traceback).

    ``functools.wraps`` keeps ``fn``'s signature visible: Gradio names the API parameters after it (without it,
    gradio_client users see param_0, param_1...)."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except (XPSRError, ValueError, FileNotFoundError, KeyError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # a bug or out of memory: the page gets one line, the console the traceback
            traceback.print_exc()
            raise gr.Error(f"the request failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                           print_exception=False) from None
    return wrapper


def _info(result) -> str:
    lines = [f"**Time** {result.seconds:.2f} s for {result.sr.shape[1]}x{result.sr.shape[0]} px",
             f"**Peak memory** {result.peak_rss_mb:,.0f} MB process RSS (highest of samples every 10 ms "
             f"during the request)"]
    if result.cuda_peak_mb is not None:
        lines.append(f"**Peak GPU memory** {result.cuda_peak_mb:,.0f} MB (torch.cuda.max_memory_allocated)")
    lines.append(f"**Mode** {result.mode}")
    lines += [f"*{note}*" for note in result.notes]
    return "  \n".join(lines)


def _video_info(result) -> str:
    height, width = result.previews[0][2].shape[:2] if result.previews else (0, 0)
    lines = [f"**Time** {result.seconds:.2f} s for {result.frames} of {result.total_frames} frames at "
             f"{width}x{height} px",
             f"**Peak memory** {result.peak_rss_mb:,.0f} MB process RSS (highest of samples every 10 ms "
             f"during the request)"]
    if result.cuda_peak_mb is not None:
        lines.append(f"**Peak GPU memory** {result.cuda_peak_mb:,.0f} MB (torch.cuda.max_memory_allocated)")
    lines.append(f"**Mode** {result.mode}")
    lines.append("**Prompts** " + "; ".join(f"{k}: {v}" for k, v in result.prompts.items()))
    lines += [f"*{note}*" for note in result.notes]
    return "  \n".join(lines)


def _video_section(engine: Engine, settings: list) -> None:
    """The video part of the page (inside the Blocks): a clip in, its first ``max_video_frames`` frames
    super-resolved with the page's settings (``settings``: steps, guidance, seed, colour fix, upscale, tiled,
    tile size), before/after frames; the API endpoint `/super_resolve_video`."""
    cap = engine.cfg.max_video_frames

    # parameter names are the API's (gradio_client: predict(video=..., api_name="/super_resolve_video"))
    @_readable
    def run_video(video, content_prompt, quality_prompt, steps, guidance, seed, color_fix, upscale, tiled,
                  tile_px):
        path, name = _upload_path(video, "a video")
        controls = parse_controls(steps, guidance, seed, color_fix, upscale, tiled, tile_px)
        result = engine.run_video(path, name, content_prompt or "", quality_prompt or "", controls)
        frames = [(np.concatenate([before, after], axis=1), f"frame {i}: before (nearest) | after (XPSR)")
                  for i, before, after in result.previews]
        return str(result.output), frames, _video_info(result)

    gr.Markdown(f"### Video\nA short clip: its first {cap} frames (max_video_frames) are super-resolved with the "
                "settings above, one prompt pair for the whole clip. Longer clips: `xpsr infer input=clip.mp4`.")
    with gr.Row():
        with gr.Column():
            video = gr.Video(label="Low-resolution clip", sources=["upload"], elem_id="video_input")
            quality = gr.Textbox(label="Quality prompt (empty = heuristic of the first frame)", lines=2,
                                 elem_id="video_quality_prompt")
            content = gr.Textbox(label="Content prompt (optional)", lines=2, elem_id="video_content_prompt")
            button = gr.Button("Super-resolve clip", variant="primary", elem_id="video_run_button")
        with gr.Column():
            output = gr.Video(label="Super-resolved clip", interactive=False, elem_id="video_result")
            gallery = gr.Gallery(label="Before | after frames", columns=1, interactive=False, format="png",
                                 elem_id="video_previews")
            info = gr.Markdown(label="Video run info", elem_id="video_run_info")
    button.click(run_video, inputs=[video, content, quality, *settings], outputs=[output, gallery, info],
                 preprocess=False, api_name="super_resolve_video", concurrency_limit=1, concurrency_id="model")


def build_app(engine: Engine) -> gr.Blocks:
    """The page, wired to ``engine``; the run endpoints are also the API `/super_resolve` and
    `/super_resolve_video` (gradio_client)."""
    cfg = engine.cfg

    @_readable
    def prefill(image):
        path, name = _upload_path(image)
        lr, _ = check_upload(path, size_limits(cfg, 1), name)
        return engine.prompts(lr)

    # parameter names are the API's (gradio_client: predict(image=..., steps=..., api_name="/super_resolve"))
    @_readable
    def run(image, content_prompt, quality_prompt, steps, guidance, seed, color_fix, upscale, tiled, tile_px):
        path, name = _upload_path(image)
        controls = parse_controls(steps, guidance, seed, color_fix, upscale, tiled, tile_px)
        result = engine.run(path, name, content_prompt or "", quality_prompt or "", controls)
        used = "\n".join(f"{k}: {v}" for k, v in result.prompts.items())
        return (result.before, result.sr), used, _info(result), str(result.png)

    with gr.Blocks(title="XPSR super-resolution", analytics_enabled=False) as app:
        onestep = engine.settings.mode == "onestep"
        gr.Markdown(f"## XPSR super-resolution\nModel: {engine.model_line} on "
                    f"{engine.device}. Mode: {engine.settings.describe()}. Outputs above "
                    f"{cfg.max_output_pixels:,} pixels (max_output_pixels) or processed above "
                    f"{cfg.max_process_pixels:,} pixels (max_process_pixels) are refused.", elem_id="model_info")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="Low-resolution image", type="filepath", sources=["upload", "clipboard"],
                                 elem_id="lr_input")
                quality = gr.Textbox(label="Quality prompt (offline heuristic; edit freely, empty = heuristic)",
                                     lines=2, elem_id="quality_prompt")
                content = gr.Textbox(label="Content prompt (" + (f"{cfg.content_captioner}" if cfg.content_captioner
                                     else "no captioner configured") + "; edit freely or leave empty)",
                                     lines=2, elem_id="content_prompt")
                with gr.Accordion("Settings", open=True):
                    unused = " (not used: one-step model)" if onestep else ""
                    steps = gr.Slider(1, max(100, cfg.num_inference_steps), value=cfg.num_inference_steps, step=1,
                                      label="Steps" + unused, interactive=not onestep)
                    guidance = gr.Slider(1.0, max(15.0, cfg.guidance_scale), value=cfg.guidance_scale, step=0.5,
                                         label="Guidance" + unused, interactive=not onestep)
                    seed = gr.Number(value=cfg.seed, precision=0, minimum=0, maximum=2**32 - 1,
                                     label="Seed (0 to 4294967295; the same seed gives the same image)")
                    color_fix = gr.Radio(["adain", "wavelet", "none"], value=cfg.color_fix, label="Colour fix")
                    upscale = gr.Slider(1, 8, value=cfg.upscale, step=1, label="Upscale")
                    tiled = gr.Checkbox(value=True, label=f"Tiled diffusion and VAE (always on above "
                                                          f"{cfg.untiled_max_side} px)")
                    tile_px = gr.Slider(128, max(1024, cfg.latent_tile * 8), value=cfg.latent_tile * 8, step=64,
                                        label="Tile size (px)")
                run_button = gr.Button("Super-resolve", variant="primary", elem_id="run_button")
            with gr.Column():
                slider = gr.ImageSlider(label="Before (bicubic) | after (XPSR)", format="png", interactive=False,
                                        elem_id="result")
                info = gr.Markdown(label="Run info", elem_id="run_info")  # the label names it in the API
                used = gr.Textbox(label="Prompts used", lines=4, interactive=False, elem_id="prompts_used")
                download = gr.File(label="Download PNG", interactive=False, elem_id="download")
        # one concurrency group of size 1 for both events: the captioner and the SR model never run at once
        image.upload(prefill, inputs=image, outputs=[quality, content], preprocess=False, api_name="prompts",
                     concurrency_limit=1, concurrency_id="model")
        run_button.click(run, inputs=[image, content, quality, steps, guidance, seed, color_fix, upscale, tiled,
                                      tile_px], outputs=[slider, used, info, download], preprocess=False,
                         api_name="super_resolve", concurrency_limit=1, concurrency_id="model")
        _video_section(engine, [steps, guidance, seed, color_fix, upscale, tiled, tile_px])
    app.queue(default_concurrency_limit=1)
    return app


def serve(cfg: ServeConfig, block: bool = True) -> gr.Blocks:
    """Load the model once, then serve the page on ``cfg.host:cfg.port`` (blocks until interrupted)."""
    output_dir = Path(cfg.output_dir) if cfg.output_dir else Path(tempfile.mkdtemp(prefix="xpsr-serve-"))
    engine = Engine(cfg, output_dir)
    app = build_app(engine)
    print(f"serve: model loaded on {engine.device}, mode {engine.settings.describe()}; results go to {output_dir}",
          flush=True)
    app.launch(server_name=cfg.host, server_port=cfg.port, share=False, show_error=True, quiet=False,
               allowed_paths=[str(output_dir)], max_file_size=f"{cfg.max_file_mb}mb", theme=THEME,
               ssr_mode=False, prevent_thread_lock=not block)
    return app
