"""Paths to other config files inside a config (issue 15): resolved against the file that names them (or the
checkout's / package's configs folder), checked, with the file they name, when the config is loaded, so that
`xpsr train --config CHECKOUT/configs/train/onestep_tiny.yaml` works from any directory and a missing
referenced file stops the command at once, before any data is prepared."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

from conftest import REPO

from xpsr.config import ConfigError, InferConfig, TrainConfig, load_config

RECIPE = REPO / "configs" / "train" / "onestep_tiny.yaml"


def test_a_recipe_finds_its_teacher_config_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TrainConfig, RECIPE, ["output_dir=run"])
    assert cfg.onestep.teacher_infer_config == str(REPO / "configs" / "infer" / "onestep_tiny_teacher.yaml")
    # on the command line a path is the user's: from the working directory, else the package's configs
    cfg = load_config(InferConfig, None, ["input=a", "output_dir=b",
                                          "caption_first=[configs/caption/empty_content.yaml]"])
    assert cfg.caption_first == [str(REPO / "configs" / "caption" / "empty_content.yaml")]
    (tmp_path / "mine.yaml").write_text("kind: quality\ncaptioner: heuristic\n")
    cfg = load_config(InferConfig, None, ["input=a", "output_dir=b", "caption_first=[mine.yaml]"])
    assert cfg.caption_first == [str(tmp_path / "mine.yaml")]


def test_a_path_is_relative_to_the_file_that_names_it(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "teacher.yaml").write_text("num_inference_steps: 3\n")
    (tmp_path / "cfg" / "train.yaml").write_text("onestep:\n  enabled: true\n  teacher_infer_config: teacher.yaml\n"
                                                 "validation:\n  infer_config: teacher.yaml\n")
    monkeypatch.chdir(REPO)
    cfg = load_config(TrainConfig, tmp_path / "cfg" / "train.yaml", ["output_dir=run"])
    assert cfg.onestep.teacher_infer_config == cfg.validation.infer_config == str(tmp_path / "cfg" / "teacher.yaml")


def test_a_broken_referenced_config_fails_at_load(tmp_path):
    (tmp_path / "teacher.yaml").write_text("num_inference_stepz: 3\n")
    (tmp_path / "train.yaml").write_text("onestep:\n  teacher_infer_config: teacher.yaml\n")
    try:
        load_config(TrainConfig, tmp_path / "train.yaml", ["output_dir=run"])
    except ConfigError as e:
        assert "teacher.yaml" in str(e) and "num_inference_stepz" in str(e)
    else:
        raise AssertionError("the unknown key of the referenced config was not found at load")


def test_a_missing_referenced_file_stops_train_before_any_work(tmp_path):
    """From another directory, a copy of the recipe whose teacher config is missing: exit 1 in about a second,
    one line naming the key, the value and where it was looked for; the run folder is never created."""
    shutil.copy(REPO / "configs" / "train" / "tiny.yaml", tmp_path / "tiny.yaml")
    (tmp_path / "onestep.yaml").write_text(RECIPE.read_text().replace("configs/infer/onestep_tiny_teacher.yaml",
                                                                      "gone/teacher.yaml"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "xpsr.cli", "train", "--config", "onestep.yaml", "output_dir=run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 1 and not (tmp_path / "run").exists(), proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "key 'onestep.teacher_infer_config' = 'gone/teacher.yaml' names a config file that does not exist" in line
    assert str(tmp_path / "gone" / "teacher.yaml") in line or "gone/teacher.yaml" in line
    print(f"refused in {seconds:.2f} s")  # no timing assert on a loaded machine; it imports no torch
