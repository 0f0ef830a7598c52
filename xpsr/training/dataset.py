"""PairedPromptDataset: LR/HR pairs from `prepare` folders with their prompts from the cache.

Each sample: ``hr`` (3, H, W) in [-1, 1]; ``lr_cond`` = LR bicubic-upsampled to HR size in [0, 1] (the
ControlNet condition, official convention); optionally ``lr`` at native size; ``content_prompt``,
``quality_prompt``; ``id``; ``hr_as_condition``. Prompts are resolved once at construction (workers
never touch SQLite) and a missing one fails there, naming the pair. Randomness per sample comes from
(seed, epoch, index), so a run can be resumed exactly.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from xpsr.config import DatasetConfig
from xpsr.data.images import ImageError, file_hash, load_rgb
from xpsr.data.manifest import FIX_HINT, RecipeMismatchError, is_old_recipe, read_manifest_lines, record_recipe
from xpsr.errors import XPSRError


class MissingPromptError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class PairDataError(XPSRError, ValueError):
    """A pair that cannot be used as it is on disk (changed file, size mismatch, undecodable image).

    A DataLoader worker's error reaches the main process rebuilt from a message holding the worker's whole
    traceback; ``str`` keeps just our message and where it happened, so the CLI prints one readable line.
    """

    def __str__(self) -> str:
        text = super().__str__()
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "\nOriginal Traceback" not in text or marker not in text:
            return text
        where = text.split("\n", 1)[0].removeprefix(f"Caught {type(self).__name__} ").rstrip(".")
        return f"{text.rsplit(marker, 1)[1].strip()} ({where})"


class _NamedBytes(io.BytesIO):
    """File bytes in memory that print as their path (load_rgb's messages name the file)."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(data)
        self.path = path

    def __str__(self) -> str:
        return str(self.path)


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


class PairedPromptDataset(Dataset):
    """One `prepare` folder. Use :func:`build_dataset` to combine several with weights."""

    def __init__(self, folder: str | Path, cfg: DatasetConfig):
        self.folder, self.cfg, self.epoch = Path(folder), cfg, 0
        manifest = self.folder / "manifest.jsonl"
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest} does not exist: run `xpsr prepare` with output_dir={self.folder}")
        self.manifest = manifest
        # read-only: a reader never repairs or rewrites the manifest (only `prepare`, holding its lock, does)
        lines = read_manifest_lines(manifest, bad_lines=cfg.bad_manifest_lines,
                                    hint=FIX_HINT + ", or set data.bad_manifest_lines=skip to leave them out")
        self.line_numbers, self.records = [n for n, _ in lines], [r for _, r in lines]
        if not self.records:
            raise ValueError(f"{manifest} lists no pairs")
        scales = {r["scale"] for r in self.records}
        if len(scales) != 1:
            raise ValueError(f"{manifest} mixes scales {sorted(scales)}")
        self.scale = scales.pop()
        self._check_recipes(manifest)
        if cfg.crop_size < self.scale or cfg.crop_size % self.scale:
            raise ValueError(f"data.crop_size={cfg.crop_size} is not a multiple of the scale x{self.scale} of "
                             f"{manifest}: the LR crop would be {cfg.crop_size / self.scale:g} px")
        self.prompts = self._resolve_prompts()
        self.latents = None
        if cfg.latent_cache:  # cached VAE moments of the HR images (xpsr.data.latent_cache)
            from xpsr.data.latent_cache import LatentCache

            self.latents = LatentCache(cfg.latent_cache)

    def _check_recipes(self, manifest: Path) -> None:
        """Pairs of an older `prepare` recipe fail (or warn with allow_old_recipe): their LR images differ."""
        old = sorted({rec for rec in map(record_recipe, self.records) if is_old_recipe(rec)})
        if not old:
            return
        message = (f"{manifest} holds pairs made with an older recipe ({', '.join(old)}): their LR images were "
                   "degraded from the plain crop, not the USM-sharpened one as the official make_train.py does; "
                   "regenerate them with `xpsr prepare` into a new folder")
        if not self.cfg.allow_old_recipe:
            raise RecipeMismatchError(message + " (or set allow_old_recipe=true to train on them anyway)")
        warnings.warn(message, stacklevel=3)

    def _resolve_prompts(self) -> list[tuple[str, str, str]]:
        """(content, quality, quality of the HR image) per record, from the cache."""
        cfg = self.cfg
        need_hr_quality = cfg.original_image_ratio > 0
        out, missing = [], []
        cache = None
        if cfg.cache is not None:
            from xpsr.captions.cache import PromptCache

            if not Path(cfg.cache).is_file():
                raise FileNotFoundError(f"prompt cache {cfg.cache} does not exist: run `xpsr caption` first")
            cache = PromptCache(cfg.cache)
        try:
            for r in self.records:
                lr_hash = r.get("lr_hash") or file_hash(self.folder / r["lr"])
                hr_hash = r.get("hr_hash") or file_hash(self.folder / r["hr"])
                found = {}
                for name, h, kind, captioner, needed in (
                    ("content", lr_hash, "content", cfg.content_captioner, True),
                    ("quality", lr_hash, "quality", cfg.quality_captioner, True),
                    ("hr_quality", hr_hash, "quality", cfg.quality_captioner, need_hr_quality),
                ):
                    text = cache.lookup(h, kind, captioner) if cache is not None and needed else None
                    if text is None and needed:
                        missing.append(f"{r['id']} ({name}, {r['lr'] if name != 'hr_quality' else r['hr']})")
                    found[name] = text or ""
                out.append((found["content"], found["quality"], found["hr_quality"]))
        finally:
            if cache is not None:
                cache.close()
        if missing and cfg.missing_prompt == "error":
            shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise MissingPromptError(
                f"{len(missing)} prompts missing for pairs in {self.folder} (cache {cfg.cache}):\n  {shown}\n"
                "Caption them (`xpsr caption`, kind=content/quality; the HR images too when original_image_ratio > 0) "
                "or set missing_prompt=empty."
            )
        return out

    def _where(self, index: int) -> str:
        return f"pair {self.records[index]['id']} (line {self.line_numbers[index]} of {self.manifest})"

    def _read(self, index: int, key: str) -> np.ndarray:
        """One image of a pair, read once: its bytes are hashed (against ``hr_hash``/``lr_hash``) and decoded."""
        r = self.records[index]
        path = self.folder / r[key]
        data = path.read_bytes()
        expected = r.get(f"{key}_hash")
        if expected and self.cfg.check_hashes:
            found = hashlib.sha256(data).hexdigest()
            if not found.startswith(expected):
                other = "lr" if key == "hr" else "hr"
                raise PairDataError(
                    f"{self._where(index)}: {path} has sha256 {found[:len(expected)]} but the manifest says "
                    f"{key}_hash={expected}: the file was changed or swapped after `prepare` (its partner: "
                    f"{self.folder / r[other]}). Delete that line and rerun `xpsr prepare` to remake the pair, "
                    "or set data.check_hashes=false to use the files as they are")
        try:
            return load_rgb(_NamedBytes(data, path))[0]
        except ImageError as e:
            raise PairDataError(f"{self._where(index)}: {e}") from e

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """``key``: an index, or ``(index, epoch)`` to fix the sample's randomness explicitly."""
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        cfg, r = self.cfg, self.records[index]
        rng = np.random.default_rng([cfg.seed, epoch, index])
        hr, lr = self._read(index, "hr"), self._read(index, "lr")
        s, c = self.scale, cfg.crop_size
        if hr.shape[:2] != (lr.shape[0] * s, lr.shape[1] * s):
            raise PairDataError(f"{self._where(index)}: HR {hr.shape[:2]} is not x{s} of LR {lr.shape[:2]}")
        lc = c // s
        if lr.shape[0] < lc or lr.shape[1] < lc:
            raise PairDataError(f"{self._where(index)}: LR {lr.shape[1]}x{lr.shape[0]} is smaller than the {lc}px "
                                "crop")
        full_hw = hr.shape[:2]
        y, x = int(rng.integers(0, lr.shape[0] - lc + 1)), int(rng.integers(0, lr.shape[1] - lc + 1))
        lr = lr[y:y + lc, x:x + lc]
        hr = hr[y * s:(y + lc) * s, x * s:(x + lc) * s]
        flip = bool(cfg.hflip and rng.uniform() < 0.5)
        if flip:
            lr, hr = lr[:, ::-1], hr[:, ::-1]
        content, quality, hr_quality = self.prompts[index]
        hr_t, lr_t = _to_tensor(hr), _to_tensor(lr)
        hr_as_condition = bool(rng.uniform() < cfg.original_image_ratio)
        if hr_as_condition:
            lr_cond, quality = hr_t.clone(), hr_quality
        else:
            lr_cond = F.interpolate(lr_t[None], size=hr_t.shape[-2:], mode="bicubic", align_corners=False)[0]
        if rng.uniform() < cfg.content_dropout:
            content = ""
        if rng.uniform() < cfg.quality_dropout:
            quality = ""
        sample = {"hr": hr_t * 2 - 1, "lr_cond": lr_cond.clamp(0, 1), "content_prompt": content,
                  "quality_prompt": quality, "id": r["id"], "hr_as_condition": hr_as_condition}
        if cfg.return_lr:
            sample["lr"] = lr_t
        if self.latents is not None:
            sample["hr_moments"] = self._moments(index, full_hw, flip)
        return sample

    def _moments(self, index: int, full_hw: tuple[int, int], flipped: bool) -> torch.Tensor:
        """The cached moments of the whole HR image: a smaller crop would need the moments of that crop."""
        r = self.records[index]
        if tuple(full_hw) != (self.cfg.crop_size, self.cfg.crop_size):
            raise PairDataError(f"{self._where(index)}: data.latent_cache needs data.crop_size equal to the HR size "
                                f"of the pairs ({full_hw[1]}x{full_hw[0]}), not {self.cfg.crop_size}")
        from xpsr.data.images import file_hash

        return self.latents.moments(r.get("hr_hash") or file_hash(self.folder / r["hr"]), flipped)


class CombinedDataset(Dataset):
    """Several datasets behind one index space; keys may carry an epoch: ``(index, epoch)``."""

    def __init__(self, parts: list[PairedPromptDataset]):
        self.parts = parts
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, None)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        local = index - int(self.offsets[part])
        return self.parts[part][(local, epoch) if epoch is not None else local]


class WeightedStreamSampler(Sampler):
    """An endless, resumable stream of ``(index, block)`` keys drawn with replacement by weight.

    Draws come in blocks of ``len(weights)``; block b is drawn with a generator seeded by (seed, b), so
    the k-th key of the stream is a pure function of (seed, k): resuming at ``start`` gives exactly
    the keys an uninterrupted run would have seen. With ``world`` processes, rank r takes keys r, r+world, ...
    The block number doubles as the epoch of the sample's crop/flip randomness.
    """

    def __init__(self, weights: torch.Tensor, seed: int = 0, rank: int = 0, world: int = 1, start: int = 0):
        self.weights = weights.double()
        self.seed, self.rank, self.world, self.start = seed, rank, world, start

    def _block(self, b: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
        return torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g)

    def __iter__(self):
        n = len(self.weights)
        k = self.start * self.world + self.rank  # global position of this rank's next key
        block_id, block = -1, None
        while True:
            b = k // n
            if b != block_id:
                block_id, block = b, self._block(b)
            yield int(block[k % n]), b
            k += self.world

    def __len__(self) -> int:  # endless; DataLoader only needs a number for progress displays
        return 2**31 - 1


def build_dataset(cfg: DatasetConfig, rank: int = 0, world: int = 1, start: int = 0):
    """All ``cfg.pairs`` folders as one dataset plus a resumable weighted sampler.

    Folder i is drawn with probability weights[i] / sum(weights) (default: proportional to its size).
    ``start`` = samples this rank has already consumed (for resuming).
    """
    if not cfg.pairs:
        raise ValueError("dataset: `pairs` is empty; list the folders written by `xpsr prepare`")
    parts = [PairedPromptDataset(folder, cfg) for folder in cfg.pairs]
    weights = cfg.weights if cfg.weights is not None else [len(p) for p in parts]
    if len(weights) != len(parts):
        raise ValueError(f"dataset: {len(weights)} weights for {len(parts)} folders")
    per_sample = torch.cat([torch.full((len(p),), w / len(p), dtype=torch.float64) for p, w in zip(parts, weights)])
    return CombinedDataset(parts), WeightedStreamSampler(per_sample, cfg.seed, rank, world, start)
