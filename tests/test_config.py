from pathlib import Path

import pytest
from conftest import REPO

from xpsr.config import SCHEMAS, BenchConfig, ConfigError, ModelConfig, describe, load_config

# configs/accelerate/ holds accelerate's own launch configs (checked by tests/test_ddp.py), not xpsr configs
ALL_YAMLS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "accelerate")


def test_there_are_configs():
    assert len(ALL_YAMLS) >= 5


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_yaml_validates(path: Path):
    folder = path.relative_to(REPO / "configs").parts[0]
    assert folder in SCHEMAS, f"configs/{folder}/ has no schema in xpsr.config.SCHEMAS"
    cfg = load_config(SCHEMAS[folder], path, allow_missing=True)
    assert isinstance(cfg, SCHEMAS[folder])


def test_overrides_apply_and_types_convert():
    cfg = load_config(ModelConfig, None, ["fusion_mode=sequential", "sfa_down_blocks=[0,1]", "sfa_mid=false"])
    assert cfg.fusion_mode == "sequential" and cfg.sfa_down_blocks == [0, 1] and cfg.sfa_mid is False


@pytest.mark.parametrize("schema, text, key", [
    (ModelConfig, "fusion_mod: sfa\n", "fusion_mod"),  # unknown key
    (BenchConfig, "resolution: big\n", "resolution"),  # wrong type
    (ModelConfig, "pixel_attention_init: ones\n", "pixel_attention_init"),  # not a choice
])
def test_bad_yaml_names_key_and_file(tmp_path, schema, text, key):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(schema, f)
    assert key in str(e.value) and str(f) in str(e.value)


def test_bad_choice_and_bad_override_syntax():
    with pytest.raises(ConfigError, match="fusion_mode"):
        load_config(ModelConfig, None, ["fusion_mode=parallel"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(ModelConfig, None, ["fusion_mode"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ModelConfig, "/nonexistent/x.yaml")


def test_describe_lists_every_leaf():
    keys = [k for k, _, _ in describe(SCHEMAS["demo"])]
    assert "model.fusion_mode" in keys and "output_dir" in keys


def test_xpsr_data_recipe_matches_the_official_generation_script():
    """configs/data/xpsr.yaml holds the values the official utils_data/make_train.py passes to BasicSR."""
    from xpsr.config import PrepareConfig

    d = load_config(PrepareConfig, REPO / "configs" / "data" / "xpsr.yaml", allow_missing=True).degradation
    s1, s2 = d.stage1, d.stage2
    assert (s1.kernel.sigma, s1.kernel.betag, s1.kernel.betap) == ([0.2, 3.0], [0.5, 4.0], [1.0, 2.0])
    assert (s2.kernel.sigma, s2.kernel.betag, s2.kernel.betap) == ([0.2, 1.5], [0.5, 4.0], [1.0, 2.0])
    assert s1.kernel.kind_probs == s2.kernel.kind_probs == [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
    assert s1.kernel.sinc_prob == s2.kernel.sinc_prob == 0.1 and d.final_sinc_prob == 0.8
    assert (s1.resize_prob, s1.resize_range, s1.noise_range, s1.poisson_scale_range) == (
        [0.2, 0.7, 0.1], [0.15, 1.5], [1.0, 30.0], [0.05, 3.0])
    assert (s2.blur_prob, s2.resize_prob, s2.resize_range, s2.noise_range, s2.poisson_scale_range) == (
        0.8, [0.3, 0.4, 0.3], [0.3, 1.2], [1.0, 25.0], [0.05, 2.5])
    assert s1.gray_noise_prob == s2.gray_noise_prob == 0.4 and s1.jpeg_range == s2.jpeg_range == [30, 95]
    assert d.usm_gt


@pytest.mark.parametrize("value, rules, why", [
    (0, {"min": 1}, "must be >= 1"), (0.0, {"above": 0}, "must be > 0"), (1.0, {"below": 1}, "must be < 1"),
    (101, {"max": 100}, "must be <= 100"), (8, {"odd": True}, "must be odd"), (12, {"multiple_of": 8}, "multiple of 8"),
    ([], {"nonempty": True}, "must not be empty"), ("  ", {"nonempty": True}, "must not be empty"),
    ([1, 2], {"length": 3}, "must have 3 values"), ([3, 1], {"ordered": True}, "[low, high]"),
    ([0, 0], {"weights": True}, "not all 0"), ([1, -1], {"weights": True}, "none negative"),
    (["a", "z"], {"each_of": ("a", "b")}, "has 'z', which is not one of ['a', 'b']"),
    ([7, 6], {"odd": True}, "has 6, which must be odd"), ("gpu", {"device": ("auto", "cpu", "cuda")}, "not a device"),
    ("cuda:x", {"device": ("cuda",)}, "not a device"),
])
def test_each_rule_refuses_what_it_should(value, rules, why):
    from xpsr.config.rules import rule_problem

    assert why in rule_problem(value, rules)


@pytest.mark.parametrize("value, rules", [
    (1, {"min": 1}), (None, {"min": 1, "nonempty": True}), ("cuda:1", {"device": ("auto", "cuda")}),
    ("auto", {"device": ("auto", "cpu")}), ([1, 1], {"ordered": True}), ([0, 2], {"weights": True}),
    ([7, 21], {"odd": True}),
])
def test_each_rule_accepts_what_it_should(value, rules):
    from xpsr.config.rules import rule_problem

    assert rule_problem(value, rules) is None


def test_a_misspelt_rule_fails_at_import_and_help_shows_the_rules():
    from xpsr.config.rules import doc

    with pytest.raises(TypeError, match="minimum"):
        doc(1, "x", minimum=1)
    rows = {k: text for k, _, text in describe(SCHEMAS["data"])}
    assert rows["degradation.stage1.kernel.sizes"].endswith("[>= 3, odd, not empty]")
    assert rows["degradation.stage1.jpeg_range"].endswith("[>= 1, <= 100, [low, high]]")
