"""Training checkpoints: trained weights (our safetensors format), optimizer, LR schedule, EMA, RNG, position.

Each checkpoint is written to a temp folder, given a checksum manifest, flushed and renamed, so
`checkpoints/step-N` is complete or absent; resuming verifies it first (`xpsr.training.integrity`) and
`resume=latest` falls back to the newest valid one. Nothing is unpickled on load: optimizer/scheduler
states are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from xpsr.models.checkpoint import CheckpointMismatchError, load_trained, save_trained
from xpsr.training.integrity import (
    REQUIRED,
    STEP_NAME,
    CheckpointWarning,
    DamagedCheckpointError,
    DiskFullError,
    fsync_dir,
    is_disk_full,
    verify_checkpoint,
    write_manifest,
    write_text_atomic,
)

TEMP_PREFIX = ".tmp-"
RUN_FILES = ("config.yaml", "environment.json")  # written at the top of the run dir at each start


@dataclass
class TrainState:
    step: int = 0
    samples: int = 0  # samples this process has consumed (the data position)
    max_steps: int | None = None  # the run's target when saved: a resume with another target may change the LR
    world: int | None = None  # processes when saved: `samples` x `world` = position in the global data stream
    global_batch: int | None = None  # samples per optimizer step over all processes, when saved


class EMA:
    """Exponential moving average of the trainable weights (fp32 copies)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for k, p in params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def swap(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Exchange live and EMA weights (call twice to undo)."""
        for k, p in params.items():
            tmp = p.detach().clone()
            p.copy_(self.shadow[k].to(p.dtype))
            self.shadow[k].copy_(tmp.float())


def save_checkpoint(folder: Path, unet, controlnet, config: dict, optimizer, lr_scheduler, state: TrainState,
                    generator: torch.Generator, ema: EMA | None, hashes: bool = True,
                    rank_generators: list[torch.Tensor] | None = None) -> Path:
    """Write everything a resume needs into ``folder`` atomically: the files go to ``.tmp-step-N``,
    then ``checksums.json``, everything is flushed to disk, and only then the folder is renamed. On any
    failure the temp folder is removed; a full disk raises :class:`DiskFullError` naming ``folder``."""
    tmp = folder.parent / f"{TEMP_PREFIX}{folder.name}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write_checkpoint_files(tmp, unet, controlnet, config, optimizer, lr_scheduler, state, generator, ema,
                                rank_generators)
        write_manifest(tmp, with_hashes=hashes)
        _put_in_place(tmp, folder)
    except BaseException as e:
        # The temp folder is ours and incomplete. ignore_errors: the error to report is the one being
        # raised; anything left is removed at the next start (remove_stale_temp).
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_disk_full(e):
            raise DiskFullError(
                f"disk full while writing checkpoint {folder}: the partial checkpoint was removed and the earlier "
                f"checkpoints are untouched; free some space, then rerun with resume=latest") from e
        raise
    return folder


def _write_checkpoint_files(tmp: Path, unet, controlnet, config: dict, optimizer, lr_scheduler, state: TrainState,
                            generator: torch.Generator, ema: EMA | None,
                            rank_generators: list[torch.Tensor] | None = None) -> None:
    save_trained(tmp / "trained.safetensors", unet, controlnet, config)
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    for name, obj in (("optimizer.pt", optimizer.state_dict()), ("scheduler.pt", lr_scheduler.state_dict())):
        with open(tmp / name, "wb") as f:  # a file object, so a failed write keeps its OSError as context
            torch.save(obj, f)
    rng = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    # every rank's own generator (one-step training draws its noise from it), gathered by the loop
    rng.update({f"generator_rank{i}": g for i, g in enumerate(rank_generators or [])})
    if torch.cuda.is_available():
        rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    np_state = np.random.get_state()
    (tmp / "state.json").write_text(json.dumps({
        **asdict(state), "python_random": repr(random.getstate()),
        "numpy_random": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }))


def _put_in_place(tmp: Path, folder: Path) -> None:
    """Rename the finished temp folder to ``folder``. A folder already there (a resume from an older
    checkpoint reached its step again) is replaced if it is a valid checkpoint; a damaged one is kept
    under another name for salvage, never deleted."""
    replaced = None
    if folder.exists():
        try:
            verify_checkpoint(folder, hashes=False)
            replaced = folder.parent / f"{TEMP_PREFIX}replaced-{folder.name}"
            if replaced.exists():
                shutil.rmtree(replaced)
            os.replace(folder, replaced)
        except DamagedCheckpointError as e:
            kept = _unused_name(folder.parent / f"{folder.name}.damaged")
            os.replace(folder, kept)
            warnings.warn(f"{folder} was damaged ({e}); it is kept as {kept}, and a new {folder.name} written",
                          CheckpointWarning, stacklevel=3)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def _unused_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.name}-{n}"), n + 1
    return candidate


@contextlib.contextmanager
def _reading(path: Path):
    """Errors while loading a checkpoint file name that file (a key/shape mismatch already does)."""
    try:
        yield
    except CheckpointMismatchError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError, SafetensorError) as e:
        raise DamagedCheckpointError(f"{path}: could not be loaded ({type(e).__name__}: {e})") from e


def load_checkpoint(folder: Path, unet, controlnet, optimizer, lr_scheduler, generator: torch.Generator,
                    ema: EMA | None, rank: int = 0) -> TrainState:
    """Load a checkpoint written by :func:`save_checkpoint` (check it first with :func:`verify_checkpoint`;
    errors here still name the file). ``generator`` gets rank ``rank``'s saved state; a rank the checkpoint has
    none for (an older checkpoint, or more ranks than saved it) keeps its own seed rather than rank 0's stream."""
    import ast

    for name in REQUIRED:
        if not (folder / name).is_file():
            raise DamagedCheckpointError(f"checkpoint {folder} is incomplete: {name} is missing")
    with _reading(folder / "trained.safetensors"):
        load_trained(folder / "trained.safetensors", unet, controlnet)
    for name, target in (("optimizer.pt", optimizer), ("scheduler.pt", lr_scheduler)):
        with _reading(folder / name):
            target.load_state_dict(torch.load(folder / name, map_location="cpu", weights_only=True))
    if ema is not None:
        if not (folder / "ema.safetensors").is_file():
            raise DamagedCheckpointError(f"use_ema is on but {folder} has no ema.safetensors")
        with _reading(folder / "ema.safetensors"):
            ema.shadow = load_file(str(folder / "ema.safetensors"))
    with _reading(folder / "rng.safetensors"):
        rng = load_file(str(folder / "rng.safetensors"))
        own = rng.get(f"generator_rank{rank}", rng["generator"] if rank == 0 else None)
        if own is not None:
            generator.set_state(own)
        torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available() and "cuda_0" in rng:
        torch.cuda.set_rng_state_all([rng[f"cuda_{i}"] for i in range(torch.cuda.device_count()) if f"cuda_{i}" in rng])
    with _reading(folder / "state.json"):
        meta = json.loads((folder / "state.json").read_text())
        random.setstate(ast.literal_eval(meta["python_random"]))
        kind, keys, *rest = meta["numpy_random"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
        return TrainState(step=meta["step"], samples=meta["samples"], max_steps=meta.get("max_steps"),
                          world=meta.get("world"), global_batch=meta.get("global_batch"))


def checkpoint_folders(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoints/step-N`` folder, oldest first (validity not checked)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = ((STEP_NAME.fullmatch(p.name), p) for p in root.iterdir() if p.is_dir())
    return sorted((int(m.group(1)), p) for m, p in found if m)


def find_checkpoint(output_dir: Path, resume: str, hashes: bool = True) -> Path | None:
    """The checkpoint to resume from. ``resume='latest'``: the newest valid ``checkpoints/step-N``; damaged
    ones are skipped and other folders ignored, each with a warning saying what is wrong; None when there
    is no checkpoint; an error listing each one when all are damaged. A folder path: that checkpoint,
    checked, or an error naming the damaged file."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"resume={resume}: no such checkpoint folder")
        for note in verify_checkpoint(path, hashes):
            warnings.warn(note, CheckpointWarning, stacklevel=2)
        return path
    root = output_dir / "checkpoints"
    for other in sorted(root.iterdir() if root.is_dir() else []):
        if not (other.name.startswith(TEMP_PREFIX) or (other.is_dir() and STEP_NAME.fullmatch(other.name))):
            warnings.warn(f"ignored {other}: not a checkpoint (checkpoints are folders named step-N)",
                          CheckpointWarning, stacklevel=2)
    damaged = []
    for _, folder in reversed(checkpoint_folders(output_dir)):
        try:
            notes = verify_checkpoint(folder, hashes)
        except DamagedCheckpointError as e:
            damaged.append(str(e))
            warnings.warn(f"skipped damaged checkpoint {folder.name}: {e}", CheckpointWarning, stacklevel=2)
            continue
        for note in notes:
            warnings.warn(note, CheckpointWarning, stacklevel=2)
        return folder
    if damaged:
        raise DamagedCheckpointError(
            f"resume=latest: every checkpoint in {root} is damaged:\n" + "\n".join(f"  {d}" for d in damaged)
            + "\nNothing was deleted. Move them aside to start afresh, or point resume= at a good copy.")
    return None


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Delete the oldest valid checkpoints beyond the newest ``keep`` valid ones. Damaged folders do not
    count and are never deleted (they are the user's to salvage or remove)."""
    if keep is None:
        return
    if keep < 1:
        raise ValueError(f"checkpoints_total_limit={keep}: keep at least 1 checkpoint (or null = all)")
    valid = []
    for _, folder in checkpoint_folders(output_dir):
        try:
            verify_checkpoint(folder, hashes=False)
        except DamagedCheckpointError:
            continue
        valid.append(folder)
    for old in valid[:-keep]:
        trash = old.parent / f"{TEMP_PREFIX}removed-{old.name}"
        os.replace(old, trash)  # a kill during the deletion leaves a temp name, not a half-deleted step-N
        shutil.rmtree(trash)


def remove_stale_temp(output_dir: Path) -> list[Path]:
    """Remove what an interrupted save left behind: ``.tmp-*`` under checkpoints/, final/, logs/ (names
    only ever written by this module, ``_atomic_save`` and ``write_text_atomic``) and the temp copies of
    the run files beside them."""
    removed = []
    leftovers = [output_dir / f"{TEMP_PREFIX}{name}" for name in RUN_FILES]
    for folder in ("checkpoints", "final", "logs"):
        leftovers += sorted((output_dir / folder).glob(f"{TEMP_PREFIX}*"))
    for path in leftovers:
        if path.exists() or path.is_symlink():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def keep_log_until(path: Path, step: int) -> str | None:
    """Rewrite a JSON-lines log keeping only rows with ``step <= step`` (a resumed session logs the later
    steps again) and dropping torn or unreadable rows (a kill or a full disk mid-write). Atomic: a temp
    file is renamed over the log. Returns what was dropped, or None when nothing was."""
    if not path.is_file():
        return None
    kept, later, unreadable = [], 0, 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row_step = json.loads(line)["step"]
            if not isinstance(row_step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if row_step <= step:
            kept.append(line + "\n")
        else:
            later += 1
    if not (later or unreadable):
        return None
    write_text_atomic(path, "".join(kept))
    return (f"{path}: dropped {later} rows after step {step} (this session logs them again) and {unreadable} "
            f"unreadable rows")


def warn_if_schedule_changes(scheduler_name: str, saved_max_steps: int | None, max_steps: int) -> str | None:
    """Resuming with another ``max_steps``: a constant schedule continues exactly; linear and cosine
    schedules are functions of ``max_steps``, so from the next step on the LR follows the curve for the
    new ``max_steps`` (a jump at the resume step, not a stretched continuation). Warns; returns the message."""
    if saved_max_steps is None or saved_max_steps == max_steps or scheduler_name.startswith("constant"):
        return None
    message = (f"resumed a run saved with max_steps={saved_max_steps} with max_steps={max_steps}: the "
               f"{scheduler_name} LR schedule depends on max_steps, so from here the LR follows the schedule "
               f"for {max_steps} steps (it jumps at the resume step)")
    warnings.warn(message, stacklevel=2)
    return message
