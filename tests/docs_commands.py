"""Docs that cannot rot: every ``xpsr ...`` and ``python scripts/...`` command line printed in README.md and
docs/*.md, checked against the config schemas without running it (tests/test_docs.py). A command is found in a
fenced code block (one per line, ``\\`` continuations joined, ``&&``/``;``/``|`` chains split, comments dropped)
or in an inline code span that starts with ``xpsr`` or ``python scripts/``. Launchers (``accelerate launch``,
``torchrun``, ``python -m torch.distributed.run``) and environment assignments in front are skipped. A
subcommand (or a script that wraps one) is checked by loading its schema with the command's ``--config`` file
and ``key=value`` overrides, which checks that every key exists and every value passes its rules (mandatory keys
may be left out: prose names `xpsr infer` alone). A config file outside ``configs/`` that does not exist is the
user's own and is not read. A script with its own argparse is checked for its flags against its ``--help``.
``...`` stands for elided arguments and is ignored. A command that is meant to fail is preceded, in its page, by
a line ``<!-- expect-fail -->``; the check then requires it to fail.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

# scripts that pass their arguments to one subcommand of xpsr.cli
WRAPPERS = {"prepare.py": "prepare", "caption.py": "caption", "train.py": "train", "infer.py": "infer",
            "evaluate.py": "eval", "benchmark.py": "bench",
            "cache_latents.py": "train"}  # reads the training config (model.base, data.pairs, data.latent_cache)
LAUNCHERS = {"accelerate", "torchrun"}
EXPECT_FAIL = "<!-- expect-fail -->"
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"`((?:xpsr|python3? scripts/)[^`]*)`")
SUBCOMMAND = re.compile(r"^[a-z][a-z-]*$|^[A-Z]+$")  # a name, or a placeholder such as SUBCOMMAND
ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass
class Command:
    """One command line as printed, where it was found, and whether the page marks it as failing."""
    source: str  # file:line
    text: str
    expect_fail: bool = False


def _fenced_lines(lines: list[str]) -> list[tuple[int, str, bool]]:
    """(line number, logical line, expect_fail) of every fenced code block, continuations joined."""
    out, inside, pending, start, fail_next, block_fail = [], False, "", 0, False, False
    for n, line in enumerate(lines, 1):
        if FENCE.match(line):
            inside, block_fail = not inside, fail_next and not inside
            fail_next = False
            continue
        if not inside:
            fail_next = line.strip() == EXPECT_FAIL or (fail_next and not line.strip())
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line, block_fail))
        pending = ""
    return out


def find_commands(path: Path, root: Path) -> list[Command]:
    """Every command line of one Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = path.relative_to(root)
    found = []
    for n, logical, fail in _fenced_lines(lines):
        found += [Command(f"{rel}:{n}", part, fail) for part in _split_chain(logical)]
    fenced = {n for n, _, _ in _fenced_lines(lines)}
    inside = False
    for n, line in enumerate(lines, 1):
        if FENCE.match(line):
            inside = not inside
        if inside or n in fenced:
            continue
        fail = n > 1 and lines[n - 2].strip() == EXPECT_FAIL
        found += [Command(f"{rel}:{n}", m.group(1), fail) for m in INLINE.finditer(line)]
    return [c for c in found if program_of(c.text) is not None]


def _split_chain(line: str) -> list[str]:
    """A shell line split at ``&&``, ``;`` and ``|`` (outside quotes), comments removed."""
    try:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split, lexer.commenters = True, "#"
        tokens = list(lexer)
    except ValueError:
        return [line]
    parts, current = [], []
    for tok in tokens:
        if tok and set(tok) <= set(";&|"):
            parts.append(shlex.join(current))
            current = []
        else:
            current.append(tok)
    parts.append(shlex.join(current))
    return [p for p in parts if p]


def program_of(text: str) -> tuple[str, list[str]] | None:
    """("xpsr SUB" or "scripts/NAME.py", its arguments), or None for any other program."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    while tokens and ENV.match(tokens[0]):
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] in LAUNCHERS or tokens[:3] in (["python", "-m", "torch.distributed.run"],):
        scripts = [i for i, t in enumerate(tokens) if t.endswith(".py") and "scripts/" in t]
        if not scripts:
            return None
        tokens = ["python"] + tokens[scripts[0]:]
    if tokens[0] == "xpsr" and len(tokens) > 1:  # `xpsr prepare: ...` (a message) or `xpsr = ...` are no commands
        return ("xpsr " + tokens[1], tokens[2:]) if SUBCOMMAND.match(tokens[1]) else None
    if tokens[0] in ("python", "python3") and len(tokens) > 1:
        if tokens[1] == "-m" and tokens[2:3] in (["xpsr"], ["xpsr.cli"]) and len(tokens) > 3:
            return "xpsr " + tokens[3], tokens[4:]
        if tokens[1].startswith("scripts/") and tokens[1].endswith(".py"):
            return tokens[1], tokens[2:]
    return None


def split_args(args: list[str]) -> tuple[str | None, list[str], list[str]]:
    """(--config FILE, key=value overrides, --flags and other words); ``...`` dropped."""
    config, overrides, other = None, [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            config, i = args[i + 1], i + 1
        elif a in ("...", "…"):
            pass
        elif a == "--config" and i + 1 < len(args):  # (``--config ...`` keeps "..." as the file: elided)
            config, i = args[i + 1], i + 1
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
        else:
            other.append(a)
        i += 1
    return config, overrides, other


def check_subcommand(sub: str, args: list[str], root: Path) -> str | None:
    """None if ``xpsr SUB ARGS`` passes the schema, else what is wrong."""
    from xpsr.cli import COMMANDS
    from xpsr.config import ConfigError, load_config

    if sub.isupper():  # `xpsr SUBCOMMAND --help`: a placeholder for any of them
        return None
    if sub not in COMMANDS:
        return f"no subcommand {sub!r} (known: {', '.join(COMMANDS)})"
    config, overrides, other = split_args(args)
    if "--help" in other or "-h" in other:
        return None
    if other:
        return f"arguments that are neither --config nor key=value: {other}"
    if config in ("...", "…") or (config and not config.startswith("configs/") and not (root / config).exists()):
        config = None  # elided, or the user's own file (e.g. the training config inside an export)
    if config is not None and not (root / config).is_file():
        return f"config file {config} does not exist"
    try:  # mandatory keys may be left out (prose mentions `xpsr infer`); the keys given must be right
        load_config(COMMANDS[sub][0], str(root / config) if config else None, overrides, allow_missing=True)
    except ConfigError as e:
        return str(e)
    return None


def check_script_flags(script: str, args: list[str], help_text: str) -> str | None:
    """None if every ``--flag`` of an argparse script appears in its ``--help``."""
    flags = [a.split("=", 1)[0] for a in args if a.startswith("--")]
    unknown = [f for f in flags if not re.search(rf"(^|[\s,\[]){re.escape(f)}\b", help_text)]
    return f"{script}: unknown options {unknown}" if unknown else None
