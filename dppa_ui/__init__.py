"""dppa-ui: explore and run merges of fine-tuned language models (DPPA, TIES, DARE, PCB).

    import dppa_ui
    dppa_ui.merge("merge.yaml", "out/merged")                 # streaming, to disk
    sd = dppa_ui.merge_in_memory(base_sd, [ft1_sd, ft2_sd], config)   # in memory
"""
from .config import ConfigError, MergeConfig, ModelSpec, load_config
from .engine import MergeResult
from .inmemory import merge_state_dicts as merge_in_memory
from .registry import PRESETS
from .runner import merge
from . import zoo  # noqa: F401,E402  registers the demo family's `demo:NAME` refs and `zoo` suite
from .version import __version__
__all__ = ["PRESETS", "ConfigError", "MergeConfig", "ModelSpec", "load_config", "merge", "MergeResult",
           "merge_in_memory", "__version__"]
