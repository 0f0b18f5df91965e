"""tiedlora-kernels: fused kernels and drop-in modules for Tied-LoRA-style adapters.

    out = x W^T + b + s * (((dropout(x) A^T) * u) B^T) * v

with A (r, K) and B (N, r) tied across the layers of a kind. See README.md and docs/MATH.md.
"""

from . import reference
from .config import PRESETS, TiedLoRAConfig
from .integrations import (adapted_layers, adapter_named_parameters, expected_trainable_parameters, export_peft,
                           from_peft, inject, load_adapter, merge, reset_adapters, save_adapter,
                           trainable_parameters, unmerge)
from .modules import TiedFactors, TiedLoRALinear, cached_adapters
from .ops import tied_lora_add, tied_lora_linear
from .serving import AdapterBank

__version__ = "0.1.0"

__all__ = ["tied_lora_linear", "tied_lora_add", "AdapterBank", "reference", "TiedLoRAConfig", "PRESETS", "inject", "merge", "unmerge",
           "save_adapter", "load_adapter", "from_peft", "export_peft", "trainable_parameters",
           "expected_trainable_parameters",
           "adapted_layers", "adapter_named_parameters", "reset_adapters", "cached_adapters", "TiedLoRALinear", "TiedFactors"]
