"""Reading config sources -- YAML files (with ``inherit``) and ``key=value`` overrides -- into layers that
remember where each key came from, with every failure a one-line ConfigError naming the file or override.

Hostile input is bounded: a config file is at most ``MAX_CONFIG_BYTES``, and a file or override value may
expand to at most ``MAX_YAML_NODES`` nodes (YAML aliases can make a few hundred bytes expand to billions).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from xpsr.errors import XPSRError, shown

MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class ConfigError(XPSRError, ValueError):
    """A configuration file or override is wrong; the one-line message names the key and where it came from."""


@dataclass
class Layer:
    """One source merged into a config: a YAML file or one override, and the dotted keys it sets."""

    label: str
    node: DictConfig
    keys: set[str] = field(default_factory=set)


def _dotted_keys(node: Any, prefix: str = "") -> set[str]:
    """The dotted keys of the leaves a node sets (an empty mapping counts as a leaf)."""
    keys = set()
    for k in node.keys():
        child = node._get_node(k)
        if isinstance(child, DictConfig) and len(child):
            keys |= _dotted_keys(child, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes after expanding aliases (an alias counts as a full copy of its anchor, as OmegaConf makes one)."""
    if id(node) not in memo:
        if isinstance(node, yaml.MappingNode):
            memo[id(node)] = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            memo[id(node)] = 1 + sum(_expanded_nodes(v, memo) for v in node.value)
        else:
            memo[id(node)] = 1
    return memo[id(node)]


def _yaml_problem(text: str, what: str) -> str | None:
    """Parse ``text`` for its shape only: what is wrong with it (syntax with line/column, size), or None."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        size = 0 if root is None else _expanded_nodes(root, {})
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        reason = " ".join(str(x) for x in (e.context, e.problem) if x)
        return f"YAML syntax error at {where}{reason}"
    except yaml.YAMLError as e:
        return f"YAML error: {' '.join(str(e).split())}"
    except RecursionError:
        return "YAML nested too deeply (or an alias that contains itself)"
    if size > MAX_YAML_NODES:
        return f"{what} expands to {size:,} YAML nodes (aliases), over the limit of {MAX_YAML_NODES:,}"
    if what == "file" and root is not None and not isinstance(root, yaml.MappingNode):
        kind = {yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}[type(root)]
        return f"a config file must be a mapping of keys (key: value lines), this one is {kind}"
    return None


def read_yaml(path: Path) -> DictConfig:
    """One config file as a DictConfig (empty for an empty file); ConfigError naming the file otherwise."""
    label = shown(path)
    if path.is_dir():
        raise ConfigError(f"config file {label} is a folder, not a YAML file")
    if not path.exists():
        raise ConfigError(f"config file {label} does not exist")
    if not path.is_file():
        raise ConfigError(f"config file {label} is not a regular file")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{label}: {path.stat().st_size:,} bytes is not a config file (limit "
                              f"{MAX_CONFIG_BYTES:,} bytes)")
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{label}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{label}: not UTF-8 text (byte {e.start}); is this a YAML file?") from None
    why = _yaml_problem(text, "file")
    if why:
        raise ConfigError(f"{label}: {why}")
    try:
        node = OmegaConf.create(text) if text.strip() else OmegaConf.create({})
    except Exception as e:  # noqa: BLE001 - anything OmegaConf dislikes in a user's file is that file's problem
        raise ConfigError(f"{label}: {first_line(e)}") from None
    if not isinstance(node, DictConfig):  # e.g. a file of only comments and a list after them
        raise ConfigError(f"{label}: a config file must be a mapping of keys (key: value lines)")
    return node


def yaml_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[Layer]:
    """``path`` and, first, what its top-level ``inherit: OTHER.yaml`` (relative to it) names, recursively."""
    if path.resolve() in seen:
        raise ConfigError(f"{shown(path)}: `inherit` loops back to a file that inherits it")
    node = read_yaml(path)
    parent = node.pop("inherit", None)
    layers = []
    if parent is not None:
        if not isinstance(parent, str) or not parent.strip():
            raise ConfigError(f"{shown(path)}: key 'inherit' = {short(parent)} must be the path of another YAML "
                              "file, relative to this one")
        layers = yaml_layers(path.parent / parent, seen + (path.resolve(),))
    return layers + [Layer(shown(path), node, _dotted_keys(node))]


def override_layer(text: str) -> Layer:
    """One ``key=value`` override (value in YAML syntax) as a layer; ConfigError naming it otherwise."""
    label = f"override {short(text)}"
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[\w-]+(\.[\w-]+)*", key.strip()):
        raise ConfigError(f"{label}: overrides look like key=value or a.b.key=value")
    why = _yaml_problem(value, "value")
    if why:
        raise ConfigError(f"{label}: {why}")
    try:
        node = OmegaConf.from_dotlist([text])
    except Exception as e:  # noqa: BLE001 - the value is user text; whatever fails in parsing it is its problem
        raise ConfigError(f"{label}: {first_line(e)}") from None
    return Layer(label, node, _dotted_keys(node) or {key.strip()})


def source_of(key: str, layers: list[Layer], default: str) -> str:
    """Label of the last layer that sets ``key``, one of its parents or one of its children."""
    key = re.sub(r"\[\d+\]$", "", key)
    for layer in reversed(layers):
        for k in layer.keys:
            if k == key or key.startswith(k + ".") or k.startswith(key + "."):
                return layer.label
    return default


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def short(value: Any, limit: int = 80) -> str:
    """A value as a one-line message shows it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
