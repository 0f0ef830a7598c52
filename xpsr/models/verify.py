"""Check our model against golden tensors produced by the official XPSR implementation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from xpsr.models.dfc import dfc_loss
from xpsr.models.forward import predict_noise
from xpsr.models.official import load_official


@dataclass
class Row:
    name: str
    max_abs_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance


def our_outputs(golden_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load the official weights via our importer and compute every golden output with our forward."""
    golden_dir = Path(golden_dir)
    unet, controlnet, _ = load_official(golden_dir)
    inputs = load_file(str(golden_dir / "inputs.safetensors"))
    with torch.no_grad():
        sample, control = predict_noise(unet, controlnet, inputs["noisy_latents"], inputs["timesteps"],
                                        inputs["content_embeds"], inputs["quality_embeds"], inputs["lr_image"])
        loss = dfc_loss(control.pixel_rgbs, control.latent_preds, inputs["hr_image"], inputs["hr_latents"])
    out = {"unet_sample": sample, "controlnet_mid_residual": control.mid_block_res_sample,
           "dfc_loss": loss.total.reshape(1)}
    out.update({f"controlnet_down_residual.{i}": r for i, r in enumerate(control.down_block_res_samples)})
    if control.latent_preds:
        out.update({f"latent_dfc.{i}": r for i, r in enumerate(control.latent_preds[:-1])})
        out["latent_dfc_mid"] = control.latent_preds[-1]
    out.update({f"pixel_dfc.{i}": r for i, r in enumerate(control.pixel_rgbs)})
    return out


def compare(golden_dir: str | Path, rel_tol: float = 1e-4) -> list[Row]:
    """One row per golden tensor; tolerance = rel_tol x max(1, max|expected|). Missing outputs fail."""
    ours = our_outputs(golden_dir)
    expected = load_file(str(Path(golden_dir) / "outputs.safetensors"))
    rows = []
    for name in sorted(expected):
        want = expected[name].float()
        tol = rel_tol * max(1.0, want.abs().max().item())
        got = ours.get(name)
        if got is None or got.shape != want.shape:
            rows.append(Row(name, float("inf"), tol))
        else:
            rows.append(Row(name, (got.float() - want).abs().max().item(), tol))
    return rows


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    lines = [f"{'tensor':<{width}}  {'max abs err':>12}  {'tolerance':>10}  ok"]
    lines += [f"{r.name:<{width}}  {r.max_abs_error:>12.3e}  {r.tolerance:>10.2e}  {'yes' if r.ok else 'NO'}"
              for r in rows]
    return "\n".join(lines)
