"""The manual cannot rot: the MkDocs site builds with --strict (broken links and anchors fail), README's links
resolve, and every command line in README.md and docs/ passes the config schemas (tests/docs_commands.py)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from docs_commands import (
    WRAPPERS,
    Command,
    check_script_flags,
    check_subcommand,
    find_commands,
    program_of,
    split_args,
)

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_commands() -> list[Command]:
    return [c for page in PAGES for c in find_commands(page, ROOT)]


def test_mkdocs_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES[1:] if f" {p.name}" not in nav]
    assert not missing, f"pages not in mkdocs.yml nav: {missing}"


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    broken = [t for t in targets if not t.startswith(("http://", "https://")) and not (ROOT / t).exists()]
    assert targets and not broken, f"README links to missing files: {broken}"


def test_readme_is_one_screen_with_the_quick_start():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "pip install -e . && xpsr demo" in text and "python -m pytest -q tests" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q tests" in ci and "scripts/install_system_deps.sh" in ci


def _script_help(script: str) -> str:
    """The script's --help text, run in this process (a child process per script costs seconds of imports)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.argv = argv
    assert exit_info.value.code in (0, None), f"{script} --help failed"
    return out.getvalue()


def check(command: Command, helps: dict[str, str]) -> str | None:
    """What is wrong with one command line, or None."""
    program, args = program_of(command.text)
    if program.startswith("xpsr "):
        return check_subcommand(program[5:], args, ROOT)
    script = Path(program).name
    if not (ROOT / program).is_file():
        return f"no script {program}"
    if script in WRAPPERS:
        if script == "benchmark.py" and args[:1] == ["--gpu-suite"]:
            return None
        return check_subcommand(WRAPPERS[script], args, ROOT)
    if program not in helps:
        helps[program] = _script_help(program)
    problem = check_script_flags(program, args, helps[program])
    if problem is None and script == "compare_usm_order.py":  # its key=value go to the prepare schema
        problem = check_subcommand("prepare", [a for a in args if "=" in a and not a.startswith("-")], ROOT)
    return problem


def test_every_command_line_in_the_docs_passes_the_schemas():
    commands = all_commands()
    assert len(commands) > 100, f"found only {len(commands)} command lines: is the extraction broken?"
    helps: dict[str, str] = {}
    wrong = []
    for c in commands:
        problem = check(c, helps)
        if c.expect_fail and problem is None:
            wrong.append(f"{c.source}: marked expect-fail but valid: {c.text}")
        elif not c.expect_fail and problem is not None:
            wrong.append(f"{c.source}: {c.text}\n    -> {problem}")
    print(f"{len(commands)} command lines checked")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("text, ok", [
    ("xpsr train max_steps=3 output_dir=runs/x", True),
    ("xpsr train max_stepz=3", False),                       # a renamed or misspelt key
    ("xpsr train max_steps=-1", False),                      # a value against its rule
    ("xpsr trian max_steps=3", False),                       # no such subcommand
    ("OMP_NUM_THREADS=1 xpsr demo output_dir=d", True),
    ("accelerate launch --num_processes 8 scripts/train.py --config configs/train/tiny.yaml seed=1", True),
    ("torchrun --nproc_per_node 2 scripts/train.py --config configs/train/nope.yaml", False),
    ("python scripts/infer.py input=a output_dir=b num_inference_steps=0", False),
])
def test_the_checker_catches_what_it_must(text, ok):
    assert (check(Command("t", text), {}) is None) == ok


def test_commands_are_found_in_fences_chains_and_inline(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("Run `xpsr eval sr=a hr=b` here.\n\n```bash\nxpsr prepare seed=1 \\\n    output_dir=o && "
                    "python scripts/train.py max_steps=2  # a comment\npip install x\n```\n\n"
                    "<!-- expect-fail -->\n```bash\nxpsr train max_stepz=1\n```\n")
    found = find_commands(page, tmp_path)
    assert [(c.text, c.expect_fail) for c in found] == [
        ("xpsr prepare seed=1 output_dir=o", False), ("python scripts/train.py max_steps=2", False),
        ("xpsr train max_stepz=1", True), ("xpsr eval sr=a hr=b", False)]
    assert split_args(["--config", "c.yaml", "a=1", "...", "--flag"]) == ("c.yaml", ["a=1"], ["--flag"])
