"""Merge configs: reading the YAML (read.py), the config model (model.py), loading and validating
it (validate.py). The names the rest of the package uses are handed on here.
"""
from .model import (PRESET_INFO, UPSCALE_METHODS, ConfigError, MergeConfig, MergeStage, ModelSpec, SliceSpec, VocabSpec,
                    rename_refs, slice_view)
from .read import DTYPE_ALIASES, NAMED_CHAT_TEMPLATES, number, read_documents
from .validate import load_config, load_stages

__all__ = ["PRESET_INFO", "UPSCALE_METHODS", "ConfigError", "MergeConfig", "MergeStage", "ModelSpec", "SliceSpec",
           "VocabSpec", "rename_refs", "slice_view", "DTYPE_ALIASES", "NAMED_CHAT_TEMPLATES", "number", "read_documents",
           "load_config", "load_stages"]
