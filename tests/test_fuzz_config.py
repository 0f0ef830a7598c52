"""Fuzzing the config step of every subcommand: bad ``key=value`` overrides and bad YAML files give exit code 1
and one line naming the key and its source (file or override), never a traceback; what is accepted obeys every
field's rules.

``xpsr.cli.main`` runs in-process with each subcommand's function replaced by a stub, so only argument parsing
and config loading run (milliseconds per example). The hypothesis runs are derandomised. A larger campaign with
counts per subcommand and input kind: ``XPSR_FUZZ_EXAMPLES=400 XPSR_FUZZ_REPORT=counts.json pytest -q
tests/test_fuzz_config.py``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from collections import Counter, defaultdict

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from xpsr import cli
from xpsr.config import describe
from xpsr.config.rules import check_config

EXAMPLES = int(os.environ.get("XPSR_FUZZ_EXAMPLES", 12))  # per subcommand and test
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
COMMANDS = sorted(cli.COMMANDS)
OUTCOMES: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (subcommand, input kind) -> accepted/rejected


def mandatory(schema: type) -> list[str]:
    """Valid values for the keys a subcommand needs (``???``), so that the fuzzed key is what gets checked."""
    return [f"{k}=x" for k in OmegaConf.missing_keys(OmegaConf.structured(schema))]


def run_config_step(command: str, argv: list[str]) -> tuple[int, str, object]:
    """``xpsr COMMAND ARGV`` up to the subcommand's function: (exit code, stderr, the config it got or None).

    Any exception escaping ``main`` fails the caller (that would be a traceback for the user)."""
    schema, _, help_text = cli.COMMANDS[command]
    got = []
    cli.COMMANDS[command] = (schema, lambda cfg: got.append(cfg) or 0, help_text)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main([command, *argv])
    finally:
        cli.COMMANDS[command] = (schema, _, help_text)
    return rc, err.getvalue(), got[0] if got else None


def check_contract(command: str, argv: list[str], names: str, kind: str) -> str:
    """Exit 0 with a config that breaks no rule, or exit 1 with one line starting `xpsr COMMAND:` that contains
    ``names`` (the key or the file). Returns 'accepted' or 'rejected'."""
    rc, err, cfg = run_config_step(command, argv)
    if rc == 0:
        schema = cli.COMMANDS[command][0]
        assert isinstance(cfg, schema) and not check_config(cfg), (argv, check_config(cfg))
        outcome = "accepted"
    else:
        assert rc == 1, (argv, rc, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"xpsr {command}: "), (argv, err)
        assert "Traceback" not in err and names in lines[0], (argv, names, err)
        outcome = "rejected"
    OUTCOMES[command, kind][outcome] += 1
    return outcome


def leaf_keys(command: str) -> list[str]:
    return [k for k, _, _ in describe(cli.COMMANDS[command][0])]


# ------------------------------------------------------------------ values that must be refused, per subcommand

NOT_POSITIVE = ["0", "-1", "-512"]
BAD_VALUES = {  # key (where the schema has it) -> values that must all be refused
    "device": ["gpu", "cuda:x", "", "cpu0"], "output_dir": ["''", "' '"], "seed": ["-1"], "workers": ["-3"],
    "num_workers": ["-1"], "batch_size": NOT_POSITIVE, "max_steps": NOT_POSITIVE, "checkpoint_every": ["-1", "-500"],
    "num_inference_steps": NOT_POSITIVE, "inference_steps": NOT_POSITIVE, "train_steps": NOT_POSITIVE,
    "steps": NOT_POSITIVE, "crop_size": NOT_POSITIVE + ["130"], "process_size": ["-512", "0"],
    "resolution": ["0", "-8", "12"], "scale": NOT_POSITIVE, "upscale": ["0", "-4"], "port": ["0", "70000"],
    "metrics": ["[]", "[psnr, nope]"], "learning_rate": ["0", "-1e-4", ".nan", ".inf"], "latent_overlap": ["-1"],
    "degradation.stage1.kernel.sizes": ["[6]", "[]", "[-7]"], "degradation.stage1.jpeg_range": ["[200,300]",
                                                                                                 "[95,30]"],
    "degradation.stage1.kernel.kind_probs": ["[1, 1]", "[0,0,0,0,0,0]"], "degradation.final_sinc_prob": ["1.5"],
    "degradation.stage2.resize_prob": ["[1]", "[-1, 1, 1]"], "degradation.kernel_pad_to": ["19", "22"],
    "max_new_tokens": ["0"], "crops_per_image": ["0"], "variants": ["-2"], "share_draws_every": ["0"],
    "model.conditioning_channels": ["[]", "[0, 1, 2, 3]"], "model.seed": ["99999999999999999999999"],
    "data.crop_size": ["100", "-64"], "validation.scheduler": ["euler"], "lr_size": ["-1"], "visual_crop": ["-1"],
    "dataset": ["Set5"], "max_file_mb": ["0"], "added_noise_level": ["-1", "1000"], "ema_decay": ["2"],
    "adam_beta2": ["1.0"], "vae_tile": ["-1"], "kind": ["both"], "timeout_s": ["-1"], "output_size": ["0", "-8"],
    "fragmentation": ["-0.1"], "fixed_gib": ["-1"], "max_video_frames": ["0"],
    "video.clip_frames": ["0"], "video.frame_step": ["0"], "video.codecs": ["[]", "[libx265]"],
    "video.crf_range": ["[40,20]", "[0,60]"], "video.frame_rate": ["0"],
}


def known_bad(command: str) -> list[tuple[str, str]]:
    keys = set(leaf_keys(command))
    return [(key, value) for key, values in BAD_VALUES.items() if key in keys for value in values]


@pytest.mark.parametrize("command", COMMANDS)
def test_known_bad_overrides_are_refused_naming_key_and_override(command):
    schema = cli.COMMANDS[command][0]
    cases = known_bad(command)
    assert cases or command in ("caption-export", "caption-import", "caption-repair", "export"), command
    for key, value in cases:
        argv = mandatory(schema) + [f"{key}={value}"]
        assert check_contract(command, argv, f"{key}={value}", "known-bad override") == "rejected", argv
    for bad in (["fusion_mod=sfa"], ["model.nope.deeper=1"], ["no_equals_sign"], ["=1"], ["a..b=1"]):
        assert check_contract(command, mandatory(schema) + bad, bad[0], "known-bad override") == "rejected", bad


def test_the_probe_findings_are_refused():
    """Values an earlier probe saw accepted silently (or fail later), each refused naming key and override.
    (checkpoint_every=0 stays valid: it is the documented "no intermediate checkpoints", used by the demo.)"""
    findings = [("train", ["output_dir=r", "checkpoint_every=-1"]), ("infer", ["input=i", "output_dir=o",
                "process_size=-512"]), ("prepare", ["output_dir=o", "workers=-3"]),
                ("prepare", ["output_dir=o", "degradation.stage1.kernel.sizes=[7,8]"]),
                ("prepare", ["output_dir=o", "degradation.stage2.jpeg_range=[200,300]"]),
                ("eval", ["sr=s", "output_dir=o", "metrics=[]"]), ("prepare", ["output_dir=o", "crop_size=130"]),
                ("bench", ["device=tpu"]), ("train", ["output_dir=r", "max_steps=-5"]),
                ("infer", ["input=i", "output_dir=o", "latent_overlap=64"])]  # stride 1: a tile per latent
    for command, argv in findings:
        rc, err, _ = run_config_step(command, argv)
        key = argv[-1].split("=")[0]
        assert rc == 1 and f"override '{argv[-1]}'" in err and f"key '{key}'" in err, err
    rc, err, _ = run_config_step("prepare", ["output_dir=o", "scale=3"])  # cross-field: crop_size 512 vs scale
    assert rc == 1 and "override 'scale=3': key 'crop_size' = 512 must be a multiple of scale (3)" in err, err


@pytest.mark.parametrize("text, says", [
    ("- a\n- b\n", "must be a mapping"), ("just a string\n", "must be a mapping"), ("42\n", "must be a mapping"),
    ("key: [unclosed\n", "YAML syntax error at line 2"), ("a: 1\n  b: 2\n", "YAML syntax error"),
    ("\tkey: 1\n", "YAML syntax error"), ("a: &x [1]\nb: *y\n", "YAML"), ("x: 1\nx: 2\n", "x"),
    ("inherit: 3\n", "inherit"), ("inherit: missing.yaml\n", "does not exist"), ("seed: !!python/object 1\n", "YAML"),
    ("a: &a [*a]\n", "YAML"), ("\xff\xfe", "not UTF-8"),
])
def test_broken_yaml_files_are_refused_naming_the_file(tmp_path, text, says):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text.encode("latin-1"))
    for command in COMMANDS:
        rc, err, _ = run_config_step(command, ["--config", str(path)])
        assert rc == 1 and str(path) in err and says in err and len(err.strip().splitlines()) == 1, (command, err)


def test_billion_laughs_and_huge_files_are_bounded(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "huge.yaml").write_text("seed: 1\n" + "# padding\n" * 200_000)
    for name, says in (("laughs.yaml", "over the limit"), ("huge.yaml", "is not a config file")):
        rc, err, _ = run_config_step("train", ["--config", str(tmp_path / name)])
        assert rc == 1 and says in err, err
    rc, err, _ = run_config_step("train", ["output_dir=r", f"seed={'[' * 5000}"])
    assert rc == 1 and "override" in err, err


def test_config_directories_links_and_inherit_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "link.yaml").symlink_to(tmp_path / "link.yaml")
    for name, says in (("a.yaml", "loops back"), ("dir.yaml", "is a folder"), ("link.yaml", "link.yaml"),
                       ("gone.yaml", "does not exist")):
        rc, err, _ = run_config_step("prepare", ["--config", str(tmp_path / name)])
        assert rc == 1 and says in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ random overrides and files (hypothesis)

SCALARS = st.one_of(
    st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["", " ", "0", "-1", "1e400", "???", "${oops}", "${oc.env:HOME}", "~",
                                           "cuda:-1", "[", "{", "}", "a: b", "- x", "&a", "*a", "!!binary x"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)


def render(value) -> str:
    """A value as override text: JSON (a YAML flow subset) for structures, else as typed."""
    return value if isinstance(value, str) else json.dumps(value, allow_nan=True)


@st.composite
def overrides(draw, command: str) -> tuple[list[str], str]:
    keys = leaf_keys(command)
    # (a key starting with "-" is an option for argparse: `--config=0` is the config option, not an override)
    key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: k.rsplit(".", 1)[0]),
                         st.text(min_size=1, max_size=10).filter(lambda k: not k.startswith("-")),
                         st.sampled_from(keys).map(lambda k: k + ".sub")))
    text = f"{key}={render(draw(VALUES))}"
    return mandatory(cli.COMMANDS[command][0]) + [text], text[:30]


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(data=st.data())
def test_random_overrides_are_accepted_by_the_rules_or_refused_in_one_line(command, data):
    argv, text = data.draw(overrides(command))
    shown_as_is = text.isprintable() and not set(text) & set("'\"\\")
    check_contract(command, argv, text if shown_as_is else "override", "random override")


@st.composite
def yaml_files(draw, command: str) -> str:
    keys = leaf_keys(command)
    kind = draw(st.integers(0, 3))
    if kind == 0:  # a mapping of real (dotted, then nested) and unknown keys to random values
        flat = draw(st.dictionaries(st.sampled_from(keys) | st.text(min_size=1, max_size=8), VALUES, max_size=4))
        nested: dict = {}
        for key, value in flat.items():
            *parents, leaf = key.split(".")
            node = nested
            for p in parents:
                node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else {}
            node[leaf] = value
        return yaml.safe_dump(nested, allow_unicode=True) if nested else ""
    if kind == 1:  # not a mapping
        return yaml.safe_dump(draw(VALUES))
    if kind == 2:  # arbitrary text
        return draw(st.text(max_size=200))
    lines = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4))  # real keys, raw YAML values
    return "".join(f"{k.split('.')[-1]}: {draw(st.sampled_from(['', '[', '{a', '- 1', '!!x', '&a', '*b', '|']))}\n"
                   for k in lines)


@pytest.mark.parametrize("command", COMMANDS)
@FUZZ
@given(data=st.data())
def test_random_yaml_files_are_accepted_by_the_rules_or_refused_naming_the_file(tmp_path, command, data):
    path = tmp_path / "fuzzed.yaml"
    path.write_bytes(data.draw(yaml_files(command)).encode("utf-8", errors="surrogatepass"))
    check_contract(command, ["--config", str(path)] + mandatory(cli.COMMANDS[command][0]), str(path),
                   "random YAML file")


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    """With XPSR_FUZZ_REPORT=FILE: the outcome counts by subcommand and input kind, as JSON (the campaign)."""
    yield
    if os.environ.get("XPSR_FUZZ_REPORT"):
        counts = {c: {kind: dict(n) for (cmd, kind), n in sorted(OUTCOMES.items()) if cmd == c} for c in COMMANDS}
        with open(os.environ["XPSR_FUZZ_REPORT"], "w") as f:
            json.dump(counts, f, indent=1)
