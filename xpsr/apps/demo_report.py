"""The demo's report.html: what the run can and cannot show, metrics, images side by side, loss curves."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

BEFORE, AFTER, BICUBIC = "prior alone (before XPSR training)", "XPSR (tiny, CPU)", "bicubic"
COLUMNS = (("LR (x4 nearest)", None), ("bicubic", "bicubic"), ("prior alone", "sr_before"), ("XPSR (ours)", "sr"))


def _png_data_uri(array: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _loss_plot(losses_jsonl: Path, prior: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in losses_jsonl.read_text().splitlines()]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), dpi=110)
    axes[0].plot(prior["vae_losses"], label="VAE reconstruction")
    axes[0].plot(prior["unet_losses"], label="base UNet noise MSE")
    axes[0].set_title("the prior (pre-training)")
    for key in ("loss", "noise_mse", "dfc_pixel", "dfc_latent"):
        axes[1].plot([r["step"] for r in rows], [r[key] for r in rows], label=key)
    axes[1].set_title("XPSR training (prior frozen)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _metrics_html(results: dict[str, dict[str, float]]) -> str:
    from xpsr.metrics.evaluate import markdown_table

    table = markdown_table(results, ["psnr", "ssim"])
    return "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>"
        for i, line in enumerate(table.strip().splitlines()) if i != 1)


def _note(results: dict, seconds: dict, summary: dict, prior: dict, noise_mse: dict) -> str:
    settings = prior["recipe"]["settings"]
    psnr = {k: v["psnr"] for k, v in results.items()}
    vae_psnr = psnr["HR through the prior's VAE"]
    verb = "falls" if noise_mse["after"] < noise_mse["before"] else "does <b>not</b> fall"
    reused = " (reused from an earlier run)" if seconds["prior"] < prior["seconds"] else ""
    return f"""<p class="note"><b>Read this first:</b> this run trains a <i>tiny</i> model on six photos, on a
CPU, in minutes. It shows that every stage works end to end (pairs, prompts, training, sampling, evaluation)
and whether XPSR training teaches the ControlNet to use the LR image: on the held-out pairs the noise-prediction
error {verb} from {noise_mse['before']:.4f} (the frozen prior alone) to {noise_mse['after']:.4f} after
{summary['steps']} XPSR steps. The sampled images start from the noised LR latent (SDEdit, the demo's default),
which already carries most of the picture, so their PSNR moves less: {psnr[BEFORE]:.2f} dB
before, {psnr[AFTER]:.2f} dB after XPSR training (bicubic: {psnr[BICUBIC]:.2f} dB). It does <b>not</b> show the
paper's quality, which needs Stable Diffusion and 300k GPU steps (docs/training.md).
XPSR freezes the VAE and the base UNet; in the paper they are Stable
Diffusion's. Here they are a stand-in made by this run{reused}: a VAE with 4x (SD: 8x) spatial compression
trained {settings['vae_steps']} steps to reconstruct crops of the training photos, and the base UNet trained
{settings['unet_steps']} steps to denoise its latents ({prior['seconds']} s). That prior knows six photos, not
the world: it draws no realistic texture, so expect a soft picture, not one sharper than bicubic. Its VAE alone
loses detail: HR &rarr; VAE &rarr; image scores {vae_psnr:.2f} dB (a blurrier
image can score higher). The text encoder is random and the prior is trained to ignore text, so prompts, classifier-free
guidance and SFA's quality prompts carry no meaning here, and 6 photos are no training set.</p>"""


def write_report(out: Path, test: Path, results: dict, seconds: dict, summary: dict, prior: dict,
                 noise_mse: dict) -> Path:
    """Write ``out/report.html`` (images inline) and return its path."""
    from xpsr.data.images import list_images, load_rgb

    _loss_plot(out / "run" / "logs" / "losses.jsonl", prior, out / "loss_curve.png")
    rows = []
    for hr_path in list_images([test / "hr"]):
        cells = [load_rgb(test / "lr" / hr_path.name)[0]]
        cells += [load_rgb(out / folder / hr_path.name)[0] for _, folder in COLUMNS[1:]]
        cells.append(load_rgb(hr_path)[0])
        imgs = "".join(f'<td><img src="{_png_data_uri(c)}" width="256" style="image-rendering:pixelated"></td>'
                       for c in cells)
        rows.append(f"<tr><td>{html.escape(hr_path.stem)}</td>{imgs}</tr>")
    heads = "".join(f"<th>{html.escape(title)}</th>" for title, _ in COLUMNS) + "<th>HR</th>"
    loss_uri = _png_data_uri(load_rgb(out / "loss_curve.png")[0])
    timing = ", ".join(f"{k.replace('_', ' ')} {v} s" for k, v in seconds.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>xpsr demo</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto}}td{{padding:4px;text-align:center}}
.note{{background:#fff4d6;padding:1em;border-radius:6px}}table.m td{{border:1px solid #ccc;padding:4px 10px}}</style>
</head><body><h1>xpsr demo report</h1>
{_note(results, seconds, summary, prior, noise_mse)}
<h2>Metrics on held-out images</h2><table class="m">{_metrics_html(results)}</table>
<h2>Images</h2><table><tr><th></th>{heads}</tr>
{''.join(rows)}</table>
<h2>Training</h2><img src="{loss_uri}"><p>XPSR: {summary['steps']} steps in {summary['seconds']} s.
Time per stage: {timing}.</p>
</body></html>"""
    report = out / "report.html"
    report.write_text(page)
    return report
