"""Configuration, the ground floor of the package: dataclass schemas per stage merged with YAML files and
``key=value`` overrides (OmegaConf).

- ``model``, ``data``, ``captions``, ``train``, ``infer``, ``evaluate``, ``demo``: the schemas of each stage;
- ``degradation``, ``onestep``, ``tools``: the nested and tool schemas;
- ``rules``: the value rules declared next to each field (``doc(512, "...", min=1)``);
- ``loader``: ``load_config`` (YAML + overrides, fail fast naming the key and the file), ``to_dict``.

Everything public is importable from ``xpsr.config`` itself, as before the package existed.
"""
from xpsr.config.captions import (  # noqa: F401
                           CaptionConfig,
                           CaptionExportConfig,
                           CaptionImportConfig,
                           CaptionMergeConfig,
                           CaptionRepairConfig,
)
from xpsr.config.data import DatasetConfig, PrepareConfig  # noqa: F401
from xpsr.config.degradation import DegradationConfig, KernelConfig, StageConfig  # noqa: F401
from xpsr.config.demo import DemoConfig, DemoPriorConfig  # noqa: F401
from xpsr.config.evaluate import EvalConfig  # noqa: F401
from xpsr.config.infer import ExportConfig, InferConfig, ServeConfig  # noqa: F401
from xpsr.config.loader import ConfigError, check_values, describe, load_config, to_dict  # noqa: F401
from xpsr.config.model import ModelConfig  # noqa: F401
from xpsr.config.onestep import LORA_TARGETS, OneStepConfig  # noqa: F401
from xpsr.config.plan import PlanConfig  # noqa: F401
from xpsr.config.rules import COLOR_FIXES, DEVICE, FUSION_MODES, METRICS, SCHEDULERS, SEED, TIMESTEP, choice, doc  # noqa: F401
from xpsr.config.tools import BenchConfig, TablesConfig  # noqa: F401
from xpsr.config.train import DFCConfig, TrainConfig, ValidationConfig  # noqa: F401

SCHEMAS: dict[str, type] = {"model": ModelConfig, "demo": DemoConfig, "bench": BenchConfig,
                           "data": PrepareConfig, "caption": CaptionConfig, "train": TrainConfig,
                           "infer": InferConfig, "eval": EvalConfig, "serve": ServeConfig,
                           "plan": PlanConfig}
