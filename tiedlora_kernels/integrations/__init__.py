"""Model integration: inject/merge adapters into any model, checkpoints, and PEFT conversion."""

from .checkpoint import load_adapter, save_adapter
from .export import export_peft
from .inject import (adapted_layers, adapter_config, adapter_named_parameters, expected_trainable_parameters,
                     inject, merge, reset_adapters, trainable_parameters, unmerge)
from .peft import from_peft

__all__ = ["inject", "merge", "unmerge", "save_adapter", "load_adapter", "from_peft", "export_peft",
           "trainable_parameters", "expected_trainable_parameters", "adapted_layers", "adapter_config",
           "adapter_named_parameters", "reset_adapters"]
