"""PairedPromptDataset: shapes, conventions, crops, prompts, HR-as-condition, dropout, weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xpsr.captions.cache import PromptCache, PromptRow
from xpsr.config import DatasetConfig
from xpsr.data.images import file_hash, save_png_atomic
from xpsr.training.dataset import MissingPromptError, PairedPromptDataset, build_dataset


def _pairs(folder, n=4, hr_size=32, scale=4, seed=0, exact=False):
    """A tiny paired folder with a manifest; ``exact``: LR is the box-average of HR (to check crop alignment)."""
    import json

    rng = np.random.default_rng(seed)
    (folder / "hr").mkdir(parents=True)
    lines = []
    for i in range(n):
        hr = rng.integers(0, 255, (hr_size, hr_size, 3), dtype=np.uint8)
        if exact:
            lr = hr.reshape(hr_size // scale, scale, hr_size // scale, scale, 3).mean((1, 3)).round().astype(np.uint8)
        else:
            lr = rng.integers(0, 255, (hr_size // scale, hr_size // scale, 3), dtype=np.uint8)
        save_png_atomic(hr, folder / "hr" / f"p{i}.png")
        save_png_atomic(lr, folder / "lr" / f"p{i}.png")
        lines.append(json.dumps({"id": f"p{i}", "hr": f"hr/p{i}.png", "lr": f"lr/p{i}.png", "scale": scale}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _caption_all(folder, cache_path, hr_too=True):
    with PromptCache(cache_path) as cache:
        rows = []
        for lr in sorted((folder / "lr").iterdir()):
            h = file_hash(lr)
            rows += [PromptRow(h, "content", "t", "q", f"content of {lr.stem}"),
                     PromptRow(h, "quality", "t", "q", f"quality of {lr.stem}")]
        if hr_too:
            rows += [PromptRow(file_hash(hr), "quality", "t", "q", f"hr quality of {hr.stem}")
                     for hr in sorted((folder / "hr").iterdir())]
        cache.put_many(rows)
    return cache_path


def _cfg(folder, cache, **kw):
    base = dict(pairs=[str(folder)], cache=str(cache) if cache else None, crop_size=16, original_image_ratio=0.0,
                hflip=False)
    base.update(kw)
    return DatasetConfig(**base)


def test_sample_conventions(tmp_path):
    folder = _pairs(tmp_path / "d")
    ds = PairedPromptDataset(folder, _cfg(folder, _caption_all(folder, tmp_path / "p.sqlite"), return_lr=True))
    s = ds[1]
    assert s["hr"].shape == (3, 16, 16) and s["lr_cond"].shape == (3, 16, 16) and s["lr"].shape == (3, 4, 4)
    assert s["hr"].min() >= -1 and s["hr"].max() <= 1 and s["lr_cond"].min() >= 0 and s["lr_cond"].max() <= 1
    ref = F.interpolate(s["lr"][None], size=(16, 16), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    assert torch.equal(s["lr_cond"], ref)  # LR bicubic-upsampled to HR size, [0, 1]
    assert s["content_prompt"] == "content of p1" and s["quality_prompt"] == "quality of p1" and s["id"] == "p1"


def test_crops_and_flips_stay_aligned(tmp_path):
    folder = _pairs(tmp_path / "d", hr_size=64, exact=True)
    ds = PairedPromptDataset(folder, _cfg(folder, None, missing_prompt="empty", return_lr=True, hflip=True))
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            hr01 = (s["hr"] + 1) / 2
            pooled = F.avg_pool2d(hr01[None], 4)[0]
            assert (pooled - s["lr"]).abs().max() <= 1 / 255 + 1e-6


def test_randomness_is_a_function_of_seed_epoch_index(tmp_path):
    folder = _pairs(tmp_path / "d", hr_size=64)
    cfg = _cfg(folder, None, missing_prompt="empty", hflip=True)
    a, b = PairedPromptDataset(folder, cfg), PairedPromptDataset(folder, cfg)
    assert torch.equal(a[2]["hr"], b[2]["hr"])
    b.set_epoch(1)
    assert any(not torch.equal(a[i]["hr"], b[i]["hr"]) for i in range(4))


def test_hr_as_condition_uses_the_hr_quality_prompt(tmp_path):
    folder = _pairs(tmp_path / "d")
    ds = PairedPromptDataset(folder, _cfg(folder, _caption_all(folder, tmp_path / "p.sqlite"),
                                          original_image_ratio=1.0))
    s = ds[0]
    assert s["hr_as_condition"] and torch.allclose(s["lr_cond"], (s["hr"] + 1) / 2)
    assert s["quality_prompt"] == "hr quality of p0" and s["content_prompt"] == "content of p0"


def test_prompt_dropout(tmp_path):
    folder = _pairs(tmp_path / "d")
    cache = _caption_all(folder, tmp_path / "p.sqlite")
    s = PairedPromptDataset(folder, _cfg(folder, cache, content_dropout=1.0, quality_dropout=1.0))[0]
    assert s["content_prompt"] == "" and s["quality_prompt"] == ""
    half = PairedPromptDataset(folder, _cfg(folder, cache, content_dropout=0.5))
    dropped = []
    for epoch in range(10):
        half.set_epoch(epoch)
        dropped += [half[i]["content_prompt"] == "" for i in range(4)]
    assert 5 < sum(dropped) < 35  # about half of 40 draws


def test_missing_prompts_name_the_images_or_become_empty(tmp_path):
    folder = _pairs(tmp_path / "d")
    cache = _caption_all(folder, tmp_path / "p.sqlite", hr_too=False)
    with pytest.raises(MissingPromptError) as e:
        PairedPromptDataset(folder, _cfg(folder, cache, original_image_ratio=0.1))
    assert "p0 (hr_quality, hr/p0.png)" in str(e.value) and "xpsr caption" in str(e.value)
    ds = PairedPromptDataset(folder, _cfg(folder, cache, original_image_ratio=0.1, missing_prompt="empty"))
    assert ds[0]["content_prompt"] == "content of p0"
    with pytest.raises(FileNotFoundError, match="run `xpsr caption` first"):
        PairedPromptDataset(folder, _cfg(folder, tmp_path / "none.sqlite"))
    with pytest.raises(FileNotFoundError, match="xpsr prepare"):
        PairedPromptDataset(tmp_path / "nothing", _cfg(folder, cache))


def test_mismatched_pair_is_refused_with_its_name(tmp_path):
    folder = _pairs(tmp_path / "d")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(folder / "lr" / "p2.png")
    ds = PairedPromptDataset(folder, _cfg(folder, None, missing_prompt="empty"))
    with pytest.raises(ValueError, match="pair p2"):
        ds[2]


def test_weighted_combination(tmp_path):
    a = _pairs(tmp_path / "a", n=2)
    b = _pairs(tmp_path / "b", n=8, seed=1)
    cfg = DatasetConfig(pairs=[str(a), str(b)], weights=[3.0, 1.0], missing_prompt="empty", crop_size=16)
    dataset, sampler = build_dataset(cfg)
    assert len(dataset) == 10
    stream = iter(sampler)
    picks = torch.tensor([next(stream)[0] for _ in range(4000)])
    share_a = (picks < 2).float().mean().item()
    assert abs(share_a - 0.75) < 0.04
    assert dataset[(9, 0)]["id"] == "p7" and dataset[0]["id"] == "p0"
    with pytest.raises(ValueError, match="weights"):
        build_dataset(DatasetConfig(pairs=[str(a)], weights=[1.0, 2.0], missing_prompt="empty", crop_size=16))


def test_stream_sampler_resumes_exactly_and_shards(tmp_path):
    from itertools import islice

    from xpsr.training.dataset import WeightedStreamSampler

    w = torch.rand(7)
    full = list(islice(iter(WeightedStreamSampler(w, seed=3)), 40))
    resumed = list(islice(iter(WeightedStreamSampler(w, seed=3, start=25)), 15))
    assert resumed == full[25:]
    ranks = [list(islice(iter(WeightedStreamSampler(w, seed=3, rank=r, world=2)), 20)) for r in (0, 1)]
    assert ranks[0] == full[0::2] and ranks[1] == full[1::2]


def test_pairs_of_an_older_recipe_fail_unless_allowed(tmp_path):
    import json

    from xpsr.data.manifest import RecipeMismatchError

    folder = _pairs(tmp_path / "d")
    manifest = folder / "manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    lines[1]["degradation"] = {"stage1": {}}  # a `prepare` line of the first recipe: no "recipe" field
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(RecipeMismatchError, match=f"{manifest}.*degrade-then-usm/v1.*allow_old_recipe"):
        PairedPromptDataset(folder, _cfg(folder, None, missing_prompt="empty"))
    with pytest.warns(UserWarning, match="older recipe"):
        ds = PairedPromptDataset(folder, _cfg(folder, None, missing_prompt="empty", allow_old_recipe=True))
    assert len(ds) == 4
    lines[1]["recipe"] = "usm-then-degrade/v2"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert len(PairedPromptDataset(folder, _cfg(folder, None, missing_prompt="empty"))) == 4
