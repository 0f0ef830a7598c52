from pathlib import Path

import pytest
from conftest import REPO

from xpsr.config import SCHEMAS, BenchConfig, ConfigError, ModelConfig, describe, load_config

ALL_YAMLS = sorted((REPO / "configs").rglob("*.yaml"))


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
