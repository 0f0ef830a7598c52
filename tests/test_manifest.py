"""manifest.jsonl read by hand-editors and crashes: every bad line named, nothing read outside, no silent loss."""
import json
import os

import numpy as np
import pytest
import torch

from xpsr.config import DatasetConfig
from xpsr.data.images import file_hash, save_png_atomic
from xpsr.data.manifest import ManifestBusyError, ManifestError, ManifestWriter, read_manifest, read_manifest_lines
from xpsr.training.dataset import PairDataError, PairedPromptDataset


def _folder(folder, n=6, hashes=True):
    """n pairs (32 px HR, x4) with a manifest like `prepare` writes (sorted keys, hashes)."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        for key, size in (("hr", 32), ("lr", 8)):
            save_png_atomic(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), folder / key / f"p{i}.png")
        record = {"id": f"p{i}", "hr": f"hr/p{i}.png", "lr": f"lr/p{i}.png", "scale": 4}
        if hashes:
            record |= {"hr_hash": file_hash(folder / record["hr"]), "lr_hash": file_hash(folder / record["lr"])}
        lines.append(json.dumps(record, sort_keys=True) + "\n")
    (folder / "manifest.jsonl").write_text("".join(lines))
    return folder / "manifest.jsonl"


def _cfg(folder, **kw):
    return DatasetConfig(pairs=[str(folder)], missing_prompt="empty", crop_size=16, hflip=False, **kw)


def test_a_bad_line_in_the_middle_is_named_and_nothing_is_cut(tmp_path):
    """The hostile probe: line 2 of 6 malformed made training cut the manifest to 1 line and train on it."""
    manifest = _folder(tmp_path / "d")
    lines = manifest.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:30] + "\n"
    manifest.write_text("".join(lines))
    before = manifest.read_bytes()
    for repair in (False, True):  # neither a reader nor `prepare` resuming may drop the lines after it
        with pytest.raises(ManifestError, match=r"1 bad line\(s\) \(2\).*line 2: not valid JSON"):
            read_manifest(manifest, repair=repair)
        assert manifest.read_bytes() == before
    with pytest.raises(ManifestError, match="bad_manifest_lines=skip"):
        PairedPromptDataset(tmp_path / "d", _cfg(tmp_path / "d"))
    with pytest.warns(UserWarning, match=r"\(2\).*skipped"):
        ds = PairedPromptDataset(tmp_path / "d", _cfg(tmp_path / "d", bad_manifest_lines="skip"))
    assert [r["id"] for r in ds.records] == ["p0", "p2", "p3", "p4", "p5"] and ds.line_numbers == [1, 3, 4, 5, 6]
    assert manifest.read_bytes() == before


HOSTILE = {
    "missing key": lambda r: {k: v for k, v in r.items() if k != "lr"},
    "scale as text": lambda r: r | {"scale": "4"},
    "scale as bool": lambda r: r | {"scale": True},
    "id as number": lambda r: r | {"id": 3},
    "empty id": lambda r: r | {"id": ""},
    "not an object": lambda r: [r],
    "absolute path": lambda r: r | {"hr": "/etc/passwd"},
    "climbs out": lambda r: r | {"hr": "../outside.png"},
    "climbs out inside": lambda r: r | {"lr": "lr/../../outside.png"},
    "dot segment": lambda r: r | {"hr": "./hr/p0.png"},
    "backslash": lambda r: r | {"hr": "hr\\p0.png"},
    "symlink out": lambda r: r | {"hr": "hr/link.png"},
    "symlinked folder": lambda r: r | {"hr": "outdir/outside.png"},
    "missing file": lambda r: r | {"lr": "lr/nope.png"},
    "a folder": lambda r: r | {"lr": "lr"},
    "bad hash": lambda r: r | {"hr_hash": "not-a-hash"},
    "duplicate id": lambda r: r | {"id": "p0"},
    "nested too deeply": lambda r: "[" * 100_000 + "]" * 100_000,
    "NaN scale": lambda r: r | {"scale": float("nan")},
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hand_edited_lines_are_refused_with_their_number(tmp_path, kind):
    manifest = _folder(tmp_path / "d", n=3)
    (tmp_path / "outside.png").write_bytes((tmp_path / "d" / "hr" / "p0.png").read_bytes())
    os.symlink(tmp_path / "outside.png", tmp_path / "d" / "hr" / "link.png")
    os.symlink(tmp_path, tmp_path / "d" / "outdir")
    lines = manifest.read_text().splitlines(keepends=True)
    bad = HOSTILE[kind](json.loads(lines[2]))
    lines[2] = (bad if isinstance(bad, str) else json.dumps(bad)) + "\n"
    manifest.write_text("".join(lines))
    with pytest.raises(ManifestError, match=rf"{manifest}: 1 bad line\(s\) \(3\): line 3: "):
        PairedPromptDataset(tmp_path / "d", _cfg(tmp_path / "d"))
    with pytest.warns(UserWarning, match="line 3"):
        assert len(PairedPromptDataset(tmp_path / "d", _cfg(tmp_path / "d", bad_manifest_lines="skip"))) == 2


def test_a_symlink_that_stays_inside_the_folder_is_fine(tmp_path):
    manifest = _folder(tmp_path / "d", n=2)
    os.symlink("p0.png", tmp_path / "d" / "hr" / "alias.png")
    record = json.loads(manifest.read_text().splitlines()[0]) | {"id": "alias", "hr": "hr/alias.png"}
    manifest.write_text(manifest.read_text() + json.dumps(record) + "\n")
    assert [r["id"] for r in read_manifest(manifest)] == ["p0", "p1", "alias"]


def test_only_the_writer_repairs_a_torn_last_line(tmp_path):
    manifest = _folder(tmp_path / "d", n=3)
    whole = manifest.read_bytes()
    lines = whole.splitlines(keepends=True)
    torn = b"".join(lines[:2]) + lines[2][:25]  # killed mid-append
    manifest.write_bytes(torn)
    with pytest.raises(ManifestError, match="line 3: not valid JSON.*torn last line.*rerunning it repairs"):
        read_manifest(manifest)
    with pytest.warns(UserWarning, match="line 3"):
        assert len(read_manifest(manifest, bad_lines="skip")) == 2
    assert manifest.read_bytes() == torn  # readers leave the file alone
    with pytest.warns(UserWarning, match="cut off torn line 3"):
        assert len(read_manifest(manifest, repair=True)) == 2
    assert manifest.read_bytes() == b"".join(lines[:2])
    manifest.write_bytes(whole[:-1])  # a complete line whose newline is missing (hand-made, or a short write)
    assert len(read_manifest(manifest)) == 3 and manifest.read_bytes() == whole[:-1]
    assert len(read_manifest(manifest, repair=True)) == 3 and manifest.read_bytes() == whole
    manifest.write_bytes(whole + b"\n  \n")  # blank lines carry no pair
    assert [n for n, _ in read_manifest_lines(manifest)] == [1, 2, 3]


def test_one_writer_per_manifest_and_a_failed_write_leaves_no_half_line(tmp_path, monkeypatch):
    import errno

    from xpsr.data.manifest import DiskFullError

    manifest = _folder(tmp_path / "d", n=2)
    before = manifest.read_bytes()
    writer = ManifestWriter(manifest)
    with pytest.raises(ManifestBusyError, match="another process"):
        ManifestWriter(manifest)
    real_write = os.write

    def half_then_full(fd, data):
        if fd == writer.fd:
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=f"disk full while writing {manifest}"):
        writer.write({"id": "p9", "hr": "hr/p0.png", "lr": "lr/p0.png", "scale": 4})
    monkeypatch.undo()
    writer.close()
    assert manifest.read_bytes() == before
    ManifestWriter(manifest).close()  # the lock went with the writer


def test_a_changed_or_swapped_image_fails_naming_the_pair_and_both_files(tmp_path):
    manifest = _folder(tmp_path / "d", n=3)
    lr = tmp_path / "d" / "lr"
    p1, p2 = (lr / "p1.png").read_bytes(), (lr / "p2.png").read_bytes()
    (lr / "p1.png").write_bytes(p2)
    (lr / "p2.png").write_bytes(p1)
    ds = PairedPromptDataset(tmp_path / "d", _cfg(tmp_path / "d"))
    ds[0]
    with pytest.raises(PairDataError) as e:
        ds[1]
    message = str(e.value)
    assert f"pair p1 (line 2 of {manifest})" in message and str(lr / "p1.png") in message
    assert str(tmp_path / "d" / "hr" / "p1.png") in message and "data.check_hashes=false" in message
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1, sampler=[2])
    with pytest.raises(PairDataError) as e:  # from a worker: one readable line, not the worker's traceback
        next(iter(loader))
    assert str(e.value).startswith("pair p2 (line 3") and "Traceback" not in str(e.value)
    assert "DataLoader worker process 0" in str(e.value)
    unchecked = PairedPromptDataset(tmp_path / "d", _cfg(tmp_path / "d", check_hashes=False))
    assert unchecked[1]["id"] == "p1"


def test_hash_checking_keeps_samples_and_their_randomness(tmp_path):
    """The checked read decodes the same bytes: samples equal those of a manifest without hashes."""
    _folder(tmp_path / "a", hashes=True)
    _folder(tmp_path / "b", hashes=False)
    cfg = DatasetConfig(pairs=[], missing_prompt="empty", crop_size=16, return_lr=True)
    a, b = PairedPromptDataset(tmp_path / "a", cfg), PairedPromptDataset(tmp_path / "b", cfg)
    for epoch in range(2):
        for i in range(6):
            sa, sb = a[(i, epoch)], b[(i, epoch)]
            assert all(torch.equal(sa[k], sb[k]) for k in ("hr", "lr", "lr_cond"))


def test_undecodable_pair_image_names_the_pair(tmp_path):
    _folder(tmp_path / "d", n=2, hashes=False)
    (tmp_path / "d" / "hr" / "p1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ds = PairedPromptDataset(tmp_path / "d", _cfg(tmp_path / "d"))
    with pytest.raises(PairDataError, match=r"pair p1 \(line 2 of .*\): .*hr/p1.png: "):
        ds[1]


def test_crop_size_must_be_a_multiple_of_the_scale(tmp_path):
    _folder(tmp_path / "d", n=1)
    with pytest.raises(ValueError, match=r"data.crop_size=18 is not a multiple of the scale x4"):
        PairedPromptDataset(tmp_path / "d", DatasetConfig(pairs=[], missing_prompt="empty", crop_size=18))
