"""Value rules of config fields: declared next to each field in xpsr/config/, checked by ``load_config``.

A field declares its rules as keyword arguments of ``doc()``/``choice()`` (defined here), e.g.
``crop_size: int = doc(512, "HR crop size", min=1)`` or ``sizes: list[int] = doc([...], "...", odd=True)``.
Number rules (``min``, ``max``, ``above``, ``below``, ``odd``, ``multiple_of``) apply to a number or to every element
of a list of numbers; ``nonempty``, ``length``, ``ordered`` and ``weights`` to the whole list (or string);
``each_of`` and ``choices`` to every element of a list or to the string; ``device`` to a device string.
``None`` (an optional field left unset) satisfies every rule. Beyond the declared rules, every int must
fit in 64 bits, every float must be finite, and the elements of a list must have the declared type.
A schema may add cross-field rules in a ``validate(self) -> list[tuple[key, why]]`` method.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from typing import Any, NamedTuple

RULES = ("min", "max", "above", "below", "odd", "multiple_of", "nonempty", "length", "ordered", "weights", "each_of",
         "choices", "device")
DEVICE_FORMS = {"auto": r"auto", "cpu": r"cpu", "cuda": r"cuda(:\d+)?", "mps": r"mps"}
INT64 = 2**63 - 1

# Value sets shared by several schemas (xpsr/config/, tools.py).
FUSION_MODES = ("sfa", "sequential", "content_only", "quality_only")
SCHEDULERS = ("ddpm", "ddim", "unipc", "dpmsolver++")
COLOR_FIXES = ("adain", "wavelet", "none")
METRICS = ("psnr", "ssim", "lpips", "dists", "fid", "niqe", "maniqa", "maniqa-pipal", "maniqa-kadid", "clipiqa",
           "musiq")
DEVICE = ("auto", "cpu", "cuda")  # `device` rule: 'auto', 'cpu', 'cuda' or 'cuda:N'
SEED = {"min": 0, "max": 2**32 - 1}  # what every RNG here takes (numpy's legacy seeds stop at 2**32)
TIMESTEP = {"min": 0, "max": 999}  # Stable Diffusion's 1000 training timesteps


class Problem(NamedTuple):
    key: str
    value: Any
    why: str


def rule_metadata(rules: dict[str, Any]) -> dict[str, Any]:
    """The metadata entries of a field's rules; refuses a misspelt rule name at import time."""
    unknown = set(rules) - set(RULES)
    if unknown:
        raise TypeError(f"unknown config rule(s) {sorted(unknown)}; known: {RULES}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in rules.items()}


def choice(default: str | None, choices: Sequence[str | None], doc: str, **rules: Any) -> Any:
    """A field whose value is one of ``choices``."""
    return field(default=default, metadata={"choices": tuple(choices), "doc": doc, **rule_metadata(rules)})


def doc(default: Any, text: str, **rules: Any) -> Any:
    """A field with its `--help` text and value rules (``min=1``, ``odd=True``...; see the module doc)."""
    metadata = {"doc": text, **rule_metadata(rules)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _number_problem(x: Any, rules: dict[str, Any]) -> str | None:
    if "min" in rules and x < rules["min"]:
        return f"must be >= {rules['min']}"
    if "above" in rules and x <= rules["above"]:
        return f"must be > {rules['above']}"
    if "max" in rules and x > rules["max"]:
        return f"must be <= {rules['max']}"
    if "below" in rules and x >= rules["below"]:
        return f"must be < {rules['below']}"
    if rules.get("odd") and x % 2 != 1:
        return "must be odd"
    if "multiple_of" in rules and x % rules["multiple_of"] != 0:
        return f"must be a multiple of {rules['multiple_of']}"
    return None


def _device_problem(value: str, forms: tuple[str, ...]) -> str | None:
    if re.fullmatch("|".join(DEVICE_FORMS[f] for f in forms), value):
        return None
    names = ["cuda or cuda:N" if f == "cuda" else f for f in forms]
    return f"is not a device here: use {', '.join(names)}"


def rule_problem(value: Any, rules: dict[str, Any]) -> str | None:
    """What is wrong with ``value`` under ``rules`` (a field's metadata), or None."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else None
    if rules.get("nonempty") and (len(value) == 0 or (isinstance(value, str) and not value.strip())):
        return "must not be empty"
    if items is not None:
        if "length" in rules and len(items) != rules["length"]:
            return f"must have {rules['length']} values"
        if rules.get("ordered") and (len(items) != 2 or items[0] > items[1]):
            return "must be a range [low, high] with low <= high"
        if rules.get("weights") and (any(x < 0 for x in items) or not any(x > 0 for x in items)):
            return "must be weights: none negative, not all 0"
        for x in items:
            why = _number_problem(x, rules) if isinstance(x, (int, float)) else None
            allowed = rules.get("each_of") or rules.get("choices")
            if why is None and allowed is not None and x not in allowed:
                why = f"is not one of {list(allowed)}"
            if why:
                return f"has {x!r}, which {why}"
        return None
    if "choices" in rules and value not in rules["choices"]:
        return f"is not one of {list(rules['choices'])}"
    if "device" in rules:
        return _device_problem(value, rules["device"])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _number_problem(value, rules)
    return None


def _element_type(hint: Any) -> tuple[type | None, type | None]:
    """(container, element type) of ``list[T]``, ``dict[str, T]`` and their optional forms; else (None, None)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _element_type(args[0]) if len(args) == 1 else (None, None)
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return origin, args[-1]
    return None, None


def _type_problem(value: Any, hint: Any) -> str | None:
    """Beyond OmegaConf's own checks: 64-bit ints, finite floats, element types inside lists and dicts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and abs(value) > INT64:
        return "is too large (beyond 64 bits)"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    container, element = _element_type(hint)
    if container is None or value is None:
        return None
    items = value.values() if container is dict else value
    for x in items:
        ok = isinstance(x, element) or (element is float and isinstance(x, int) and not isinstance(x, bool))
        if not ok:
            return f"has {x!r}, which is not a {element.__name__}"
        why = _type_problem(x, element)
        if why:
            return f"has {x!r}, which {why}"
    return None


def check_config(obj: Any, prefix: str = "") -> list[Problem]:
    """Every broken rule of a config dataclass instance and of its nested configs, with dotted keys."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += check_config(value, key + ".")
            continue
        why = _type_problem(value, hints[f.name]) or rule_problem(value, f.metadata)
        if why:
            problems.append(Problem(key, value, why))
    if not problems and hasattr(obj, "validate"):
        problems += [Problem(prefix + key, getattr(obj, key), why) for key, why in obj.validate()]
    return problems


def describe_rules(metadata: typing.Mapping[str, Any]) -> str:
    """The rules of a field as `--help` shows them, e.g. '{a|b}' or '[>= 1, odd]'."""
    if "choices" in metadata:
        return "{" + "|".join(str(c) for c in metadata["choices"]) + "}"
    parts = []
    for name, text in (("min", ">= {}"), ("above", "> {}"), ("max", "<= {}"), ("below", "< {}"),
                       ("multiple_of", "multiple of {}"), ("length", "{} values"), ("each_of", "each of {}")):
        if name in metadata:
            value = metadata[name]
            parts.append(text.format("|".join(value) if isinstance(value, tuple) else value))
    for flag, text in (("odd", "odd"), ("nonempty", "not empty"), ("ordered", "[low, high]"),
                       ("weights", "weights")):
        if metadata.get(flag):
            parts.append(text)
    if "device" in metadata:
        parts.append("|".join("cuda[:N]" if f == "cuda" else f for f in metadata["device"]))
    return f"[{', '.join(parts)}]" if parts else ""
