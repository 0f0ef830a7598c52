"""Checkpoint integrity without training: damage of each kind is found, named and never loaded or deleted.

The checkpoints are written by ``save_checkpoint`` from a tiny model in the test (a second or so), so
these tests need no training run; tests/test_train_faults.py runs the real `xpsr train` under faults.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from xpsr.training import checkpointing
from xpsr.training.checkpointing import EMA, TrainState, save_checkpoint
from xpsr.training.integrity import CheckpointWarning, DamagedCheckpointError


@pytest.fixture(scope="module")
def saved_checkpoints(tmp_path_factory) -> Path:
    """checkpoints/step-3 and step-4 of a tiny model with a stepped AdamW, its schedule and an EMA."""
    from conftest import tiny_config

    from xpsr.models.build import build_xpsr

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    modules = build_xpsr(tiny_config())
    params = [p for p in modules.controlnet.parameters()][:8]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = EMA({str(i): p for i, p in enumerate(params)}, 0.9)
    for step in (3, 4):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        schedule.step()
        save_checkpoint(root / "checkpoints" / f"step-{step}", modules.unet, modules.controlnet, {"seed": 1},
                        optimizer, schedule, TrainState(step=step, samples=2 * step, max_steps=6),
                        torch.Generator().manual_seed(step), ema)
    return root


@pytest.fixture
def two_checkpoints(saved_checkpoints, tmp_path) -> Path:
    """A fresh copy of the run dir with step-3 and step-4, for a test to damage."""
    shutil.copytree(saved_checkpoints / "checkpoints", tmp_path / "checkpoints")
    return tmp_path


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_a_byte(path: Path) -> None:  # same size: only the hash tells
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("trained.safetensors", _truncate, r"\d+ bytes, checksums.json says \d+"),
    "truncated optimizer": ("optimizer.pt", _truncate, r"\d+ bytes, checksums.json says \d+"),
    "missing schedule": ("scheduler.pt", Path.unlink, "missing"),
    "garbage state": ("state.json", lambda p: p.write_text('{"step": 4, "sampl'), r"\d+ bytes, checksums.json"),
    "flipped byte": ("optimizer.pt", _flip_a_byte, "sha256 differs"),
    "garbage manifest": ("checksums.json", lambda p: p.write_text("\x00\x01 not json"), "unreadable checksum"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damage_is_detected_naming_the_file(two_checkpoints, kind):
    name, damage, reason = DAMAGE[kind]
    step4 = two_checkpoints / "checkpoints" / "step-4"
    damage(step4 / name)
    with pytest.warns(CheckpointWarning, match=f"skipped damaged checkpoint step-4: .*{re.escape(name)}: {reason}"):
        assert checkpointing.find_checkpoint(two_checkpoints, "latest") == two_checkpoints / "checkpoints" / "step-3"
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{step4 / name}: ") + reason):
        checkpointing.find_checkpoint(two_checkpoints, str(step4))
    assert step4.is_dir()  # never deleted


WITHOUT_MANIFEST = {
    "truncated weights": ("trained.safetensors", _truncate, "unreadable safetensors file"),
    "truncated optimizer": ("optimizer.pt", _truncate, "not a complete torch archive"),
    "missing schedule": ("scheduler.pt", Path.unlink, "missing"),
    "garbage state": ("state.json", lambda p: p.write_text('{"step": 4, "sampl'), "unreadable training state"),
    "state of another step": ("state.json", lambda p: p.write_text('{"step": 9, "samples": 18}'),
                              "says step 9, but the folder is named step-4"),
}


@pytest.mark.parametrize("kind", WITHOUT_MANIFEST)
def test_checkpoints_without_a_manifest_load_with_a_warning_and_damage_is_still_caught(two_checkpoints, kind):
    """Checkpoints written before checksums.json existed (or whose manifest was lost): structure checks."""
    for step in (3, 4):
        (two_checkpoints / "checkpoints" / f"step-{step}" / "checksums.json").unlink()
    with pytest.warns(CheckpointWarning, match="step-4 has no checksums.json"):
        assert checkpointing.find_checkpoint(two_checkpoints, "latest").name == "step-4"
    name, damage, reason = WITHOUT_MANIFEST[kind]
    step4 = two_checkpoints / "checkpoints" / "step-4"
    damage(step4 / name)
    with pytest.warns(CheckpointWarning) as caught:
        assert checkpointing.find_checkpoint(two_checkpoints, "latest").name == "step-3"
    assert any(f"skipped damaged checkpoint step-4: {step4 / name}: {reason}" in str(w.message) for w in caught)
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{step4 / name}: {reason}")):
        checkpointing.find_checkpoint(two_checkpoints, str(step4))


def test_a_foreign_folder_is_ignored_with_a_warning_naming_it(two_checkpoints):
    foreign = two_checkpoints / "checkpoints" / "step-old"
    shutil.copytree(two_checkpoints / "checkpoints" / "step-3", foreign)
    with pytest.warns(CheckpointWarning, match=re.escape(f"ignored {foreign}: not a checkpoint")):
        assert checkpointing.find_checkpoint(two_checkpoints, "latest").name == "step-4"
    checkpointing.prune_checkpoints(two_checkpoints, 1)
    assert sorted(p.name for p in (two_checkpoints / "checkpoints").iterdir()) == ["step-4", "step-old"]


def test_every_checkpoint_damaged_is_an_error_listing_each(two_checkpoints):
    _truncate(two_checkpoints / "checkpoints" / "step-3" / "rng.safetensors")
    (two_checkpoints / "checkpoints" / "step-4" / "state.json").unlink()
    with pytest.warns(CheckpointWarning), pytest.raises(DamagedCheckpointError) as info:
        checkpointing.find_checkpoint(two_checkpoints, "latest")
    assert "step-3/rng.safetensors" in str(info.value) and "step-4/state.json: missing" in str(info.value)
    assert "Nothing was deleted" in str(info.value)


def test_pruning_never_counts_or_deletes_a_damaged_checkpoint(two_checkpoints):
    _truncate(two_checkpoints / "checkpoints" / "step-4" / "optimizer.pt")
    checkpointing.prune_checkpoints(two_checkpoints, 1)  # step-3 is the only valid one: it stays
    assert sorted(p.name for p in (two_checkpoints / "checkpoints").iterdir()) == ["step-3", "step-4"]


def test_load_errors_name_the_file(two_checkpoints, make_tiny):
    from xpsr.models.checkpoint import UnreadableWeightsError, load_trained

    weights = two_checkpoints / "checkpoints" / "step-4" / "trained.safetensors"
    _truncate(weights)
    m = make_tiny()
    with pytest.raises(UnreadableWeightsError, match=re.escape(f"{weights}: not a readable safetensors file")):
        load_trained(weights, m.unet, m.controlnet)
    optimizer_file = two_checkpoints / "checkpoints" / "step-3" / "optimizer.pt"
    _truncate(optimizer_file)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(DamagedCheckpointError, match=re.escape(f"{optimizer_file}: could not be loaded")):
        checkpointing.load_checkpoint(optimizer_file.parent, m.unet, m.controlnet, optimizer, None,
                                      torch.Generator(), None)


def test_a_full_disk_is_recognised_through_torch_and_safetensors_errors(tmp_path):
    from xpsr.training.integrity import is_disk_full

    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    # depending on where the write fails, torch raises the OSError or its own RuntimeError over it
    with pytest.raises((RuntimeError, OSError)) as info:
        torch.save({"x": torch.zeros(1000)}, FullDisk())
    assert is_disk_full(info.value)
    try:
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos")
    except RuntimeError as wrapper:
        wrapper.__context__ = OSError(errno.ENOSPC, "disk")
        assert "space" not in str(wrapper) and is_disk_full(wrapper)
    assert is_disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"))


def test_checkpoint_every_zero_warns_and_limits_below_one_are_refused():
    from xpsr.config import TrainConfig
    from xpsr.errors import XPSRError
    from xpsr.training.loop import check_checkpoint_settings

    with pytest.warns(CheckpointWarning, match="checkpoint_every=0: no checkpoints are written"):
        check_checkpoint_settings(TrainConfig(output_dir="x", checkpoint_every=0))
    for bad in (dict(checkpoint_every=-5), dict(checkpoints_total_limit=0)):
        with pytest.raises(XPSRError, match=next(iter(bad))):
            check_checkpoint_settings(TrainConfig(output_dir="x", **bad))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_checkpoint_settings(TrainConfig(output_dir="x", checkpoint_every=5, checkpoints_total_limit=1))


def test_a_restart_removes_only_the_temp_files_an_interrupted_save_left(tmp_path):
    from xpsr.training.integrity import write_text_atomic

    write_text_atomic(tmp_path / "config.yaml", "seed: 1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # the temp copy was renamed over it
    left = [tmp_path / ".tmp-config.yaml", tmp_path / "checkpoints" / ".tmp-step-7" / "optimizer.pt",
            tmp_path / "final" / ".tmp-abc.safetensors", tmp_path / "logs" / ".tmp-losses.jsonl"]
    kept = [tmp_path / ".tmp-notes.txt", tmp_path / "checkpoints" / "step-6" / ".tmp-x", tmp_path / "logs" / "a.log"]
    for path in left + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    removed = checkpointing.remove_stale_temp(tmp_path)
    assert sorted(removed) == sorted([left[0], left[1].parent, *left[2:]])
    assert all(p.exists() for p in kept) and not any(p.exists() for p in left)
    assert (tmp_path / "config.yaml").read_text() == "seed: 1\n"


def test_an_atomic_write_on_a_full_disk_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    from xpsr.training.integrity import DiskFullError, disk_full_is_an_error, write_text_atomic

    target = tmp_path / "config.yaml"
    target.write_text("seed: 1\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match=f"disk full while writing {re.escape(str(target))}: free some space"):
        with disk_full_is_an_error(str(target)):
            write_text_atomic(target, "seed: 2\n")
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"] and target.read_text() == "seed: 1\n"


def test_each_rank_resumes_its_own_generator(tmp_path):
    """Several ranks: every rank's generator (one-step training's noise) is saved, and each rank gets its own
    back; a rank the checkpoint has none for keeps its own seed instead of repeating rank 0's stream."""
    from conftest import tiny_config

    from xpsr.models.build import build_xpsr

    modules = build_xpsr(tiny_config())
    params = [p for p in modules.controlnet.parameters()][:2]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ranks = [torch.Generator().manual_seed(100 + r) for r in range(2)]
    for g in ranks:
        torch.rand(3, generator=g)  # advanced, as after some steps
    folder = save_checkpoint(tmp_path / "step-1", modules.unet, modules.controlnet, {"seed": 1}, optimizer,
                             schedule, TrainState(step=1, samples=2, world=2), ranks[0], None,
                             rank_generators=[g.get_state() for g in ranks])

    def resumed(rank: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + rank)  # as the loop seeds each rank
        checkpointing.load_checkpoint(folder, modules.unet, modules.controlnet, optimizer, schedule, g, None,
                                      rank=rank)
        return torch.rand(4, generator=g)

    expected = [torch.rand(4, generator=g) for g in ranks]
    assert torch.equal(resumed(0), expected[0]) and torch.equal(resumed(1), expected[1])
    assert torch.equal(resumed(2), torch.rand(4, generator=torch.Generator().manual_seed(1002)))
