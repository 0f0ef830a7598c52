"""Configuration, the ground floor of the package: dataclass schemas per stage merged with YAML files and
``key=value`` overrides (OmegaConf).

- ``schema``: the schemas of the stages (prepare, caption, train, infer, eval, export, serve, demo);
- ``degradation``, ``onestep``, ``tools``: the nested and tool schemas;
- ``rules``: the value rules declared next to each field (``doc(512, "...", min=1)``);
- ``loader``: ``load_config`` (YAML + overrides, fail fast naming the key and the file), ``to_dict``.

Everything public is importable from ``xpsr.config`` itself, as before the package existed.
"""
from xpsr.config.schema import *  # noqa: F401,F403 - every public name of the schemas, as `xpsr.config` had
