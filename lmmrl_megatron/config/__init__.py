"""Typed run configuration: `RunConfig` (the schema) and `load_config` (YAML + dotted overrides)."""

from lmmrl_megatron.config.loader import dump_yaml, from_dict, load_config, to_dict
from lmmrl_megatron.config.schema import RunConfig

__all__ = ["RunConfig", "dump_yaml", "from_dict", "load_config", "to_dict"]
