"""Loading a config: defaults of a schema <- YAML files (with ``inherit``) <- ``key=value`` overrides, each
source a layer that remembers the keys it sets, so that every failure -- syntax, unknown key, wrong type, a
value against a field's rules (xpsr/config/rules.py) -- is a one-line ConfigError naming the key and the file
or override it came from.

Hostile input is bounded: a config file is at most ``MAX_CONFIG_BYTES``, and a file or override value may
expand to at most ``MAX_YAML_NODES`` nodes (YAML aliases can make a few hundred bytes expand to billions).
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from xpsr.config.rules import check_config, describe_rules
from xpsr.errors import XPSRError, one_line, shown

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000


class ConfigError(XPSRError, ValueError):
    """A configuration file or override is wrong; the one-line message names the key and where it came from."""

    def __init__(self, message: str):
        super().__init__(one_line(message))  # keys and values are user text: a newline in them stays escaped


@dataclass
class Layer:
    """One source merged into a config: a YAML file or one override, and the dotted keys it sets."""

    label: str
    node: DictConfig
    keys: set[str] = field(default_factory=set)
    origin: Path | None = None  # the YAML file, whose folder paths to other configs in it are relative to


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
    try:
        mode, size = path.stat().st_mode, path.stat().st_size
    except OSError as e:  # missing, a dangling link or a link loop, a folder we may not enter
        what = "does not exist" if e.errno == errno.ENOENT else f"cannot be read ({e.strerror or e})"
        raise ConfigError(f"config file {label} {what}") from None
    if stat.S_ISDIR(mode):
        raise ConfigError(f"config file {label} is a folder, not a YAML file")
    if not stat.S_ISREG(mode):  # a FIFO would block the read forever
        raise ConfigError(f"config file {label} is not a regular file")
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{label}: {size:,} bytes is not a config file (limit {MAX_CONFIG_BYTES:,} bytes)")
    try:
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
        raise ConfigError(f"{label}: cannot read it as YAML ({first_line(e)})") from None
    if not isinstance(node, DictConfig):  # e.g. a file of only comments and a list after them
        raise ConfigError(f"{label}: a config file must be a mapping of keys (key: value lines)")
    return node


def yaml_layers(path: Path, seen: tuple[str, ...] = ()) -> list[Layer]:
    """``path`` and, first, what its top-level ``inherit: OTHER.yaml`` (relative to it) names, recursively."""
    if os.path.realpath(path) in seen:
        raise ConfigError(f"{shown(path)}: `inherit` loops back to a file that inherits it")
    node = read_yaml(path)
    parent = node.pop("inherit", None)
    layers = []
    if parent is not None:
        if not isinstance(parent, str) or not parent.strip():
            raise ConfigError(f"{shown(path)}: key 'inherit' = {short(parent)} must be the path of another YAML "
                              "file, relative to this one")
        target = path.parent / parent
        if not os.path.lexists(target):
            raise ConfigError(f"{shown(path)}: key 'inherit' names {shown(target)}, which does not exist")
        layers = yaml_layers(target, seen + (os.path.realpath(path),))
    return layers + [Layer(shown(path), node, _dotted_keys(node), Path(path))]


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


def _merge(merged: DictConfig, layer: Layer) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer.node)
    except (OmegaConfBaseException, ValueError, TypeError, RecursionError) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", None)
        where = f" key '{key}':" if key else ""
        raise ConfigError(f"{layer.label}:{where} {first_line(e)}") from None


def check_values(obj: Any, source: str, layers: Sequence[Layer] = ()) -> None:
    """ConfigError naming every value of ``obj`` that breaks its field's rules (one line; the source of each key
    is the layer that set it, else ``source``)."""
    problems = check_config(obj)
    if problems:
        raise ConfigError("; ".join(f"{_blamed(p.key, p.why, list(layers), source)}: key '{p.key}' = "
                                    f"{short(p.value)} {p.why}" for p in problems))


def _blamed(key: str, why: str, layers: list[Layer], default: str) -> str:
    """The source of a bad value: the layer that set ``key``; for a cross-field rule on a key no layer set
    (crop_size vs scale), the last layer that set a key the reason names."""
    found = source_of(key, layers, "")
    if found:
        return found
    for layer in reversed(layers):
        if any(re.search(rf"\b{re.escape(k.rsplit('.', 1)[-1])}\b", why) for k in layer.keys):
            return layer.label
    return default


@functools.cache
def _defaults(schema: type) -> DictConfig:
    """The schema's defaults as a read-only DictConfig, built once (it is the slow step; merges copy it)."""
    node = OmegaConf.structured(schema)
    OmegaConf.set_readonly(node, True)
    return node


def section_layers(schema: type, layers: list[Layer]) -> list[Layer]:
    """The layers of the files that ``schema.SECTION_FILES`` keys name (e.g. `xpsr plan`'s ``train_config``: an
    `xpsr train` YAML read into the ``train`` section), each wrapped under its section. They go first, so keys
    of that section set in the YAML or on the command line apply on top of the file, not under it. Mandatory
    keys the file leaves open (``???``, e.g. output_dir) keep the section's default."""
    out = []
    for key, section in getattr(schema, "SECTION_FILES", {}).items():
        value = next((layer.node[key] for layer in reversed(layers) if key in layer.node), None)
        if value is None:
            continue
        if not isinstance(value, str) or not os.path.isfile(value):
            raise ConfigError(f"key '{key}' = {short(value)}: not a YAML file (paths are relative to the working "
                              "folder)")
        for layer in yaml_layers(Path(value)):
            body = {k: v for k, v in OmegaConf.to_container(layer.node).items() if v != "???"}
            out.append(Layer(f"{key} {layer.label}", OmegaConf.create({section: body}),
                             {f"{section}.{k}" for k in layer.keys}, layer.origin))
    return out


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                allow_missing: bool = False) -> T:
    """Defaults of ``schema`` <- YAML at ``path`` <- ``key=value`` overrides; returns a checked ``schema``."""
    layers = yaml_layers(Path(path)) if path is not None else []
    layers += [override_layer(str(o)) for o in overrides]
    layers = section_layers(schema, layers) + layers
    merged = _defaults(schema)
    try:  # one merge (each merge copies the whole tree); layer by layer only to name the one that fails
        merged = OmegaConf.merge(merged, *(layer.node for layer in layers))
    except (OmegaConfBaseException, ValueError, TypeError, RecursionError):
        for layer in layers:
            merged = _merge(merged, layer)
    if allow_missing:  # validation of a config file whose mandatory keys come on the command line
        merged = OmegaConf.merge(merged, {k: "<set on the command line>" for k in OmegaConf.missing_keys(merged)})
    try:
        obj = OmegaConf.to_object(merged)
    except MissingMandatoryValue as e:
        key = str(getattr(e, "full_key", None) or getattr(e, "key", None))
        raise ConfigError(f"key '{key}' needs a value: give {key}=VALUE or set it in the config file") from None
    except OmegaConfBaseException as e:  # e.g. an interpolation ${...} that does not resolve
        key = str(getattr(e, "full_key", None) or getattr(e, "key", None))
        raise ConfigError(f"{source_of(key, layers, 'defaults')}: key '{key}': {first_line(e)}") from None
    check_values(obj, "defaults", layers)
    resolve_config_refs(obj, layers)
    return obj  # type: ignore[return-value]


# Keys whose value is the path of another config file, and the schema (configs/ folder) it is read with.
CONFIG_REFS = {"onestep.teacher_infer_config": "infer", "validation.infer_config": "infer",
               "caption_first": "caption", "content_captioner": "caption"}
PACKAGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the checkout's configs/ beside the xpsr package


def _ref_candidates(value: str, layer: Layer | None) -> list[Path]:
    """Where a config path may be, in order. Written in a YAML file: relative to that file, then to the checkout
    holding its ``configs/`` folder (``configs/infer/x.yaml`` as the shipped recipes write it), then to the
    package's configs. On the command line: relative to the working directory, then to the package's configs."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return [path]
    inside = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else None
    found = []
    if layer is not None and layer.origin is not None:
        found.append(layer.origin.parent / path)
        roots = [p for p in layer.origin.resolve().parents if p.name == "configs"]
        if roots and inside is not None:
            found.append(roots[0] / inside)
    else:
        found.append(path)
    if inside is not None:
        found.append(PACKAGE_CONFIGS / inside)
    return found


def _resolve_ref(key: str, value: str, layers: list[Layer]) -> str:
    setter = next((la for la in reversed(layers) if any(k == key or k.startswith(key + "[") for k in la.keys)),
                  None)
    candidates = _ref_candidates(value, setter)
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.absolute())
    looked = ", ".join(shown(c) for c in dict.fromkeys(candidates))
    raise ConfigError(f"{setter.label if setter else 'defaults'}: key '{key}' = {short(value)} names a config file "
                      f"that does not exist (looked for {looked})")


def resolve_config_refs(obj: Any, layers: list[Layer]) -> None:
    """Replace each path to another config file (CONFIG_REFS) by the absolute path of the file it names and load
    that file with its schema, so a missing or broken referenced config fails now, before any work starts, and
    the run's saved config names the file wherever it is reread from."""
    from xpsr.config import SCHEMAS  # config.py imports this module

    for key, kind in CONFIG_REFS.items():
        holder, *path = [obj, *key.split(".")]
        for name in path[:-1]:
            holder = getattr(holder, name, None)
        value = getattr(holder, path[-1], None) if holder is not None else None
        if not value:
            continue
        values = [value] if isinstance(value, str) else list(value)
        resolved = [_resolve_ref(key, str(v), layers) for v in values]
        for file in resolved:
            load_config(SCHEMAS[kind], file, allow_missing=True)
        setattr(holder, path[-1], resolved[0] if isinstance(value, str) else resolved)


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-serialisable dict of a config dataclass."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def describe(schema: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, Any, str]]:
    """(key, default, doc and rules) for every leaf of ``schema``: what `--help` prints. ``defaults``: an
    instance whose values are the defaults (a nested section's own defaults can differ from its class's)."""
    rows = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if defaults is not None:
            default = getattr(defaults, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            rows += describe(type(default), key + ".", default)
            continue
        rules = describe_rules(f.metadata)
        rows.append((key, default, f"{f.metadata.get('doc', '')} {rules}".rstrip()))
    return rows
