"""A shell of a model's linear layers: the same module paths and weight shapes, nothing else. What
``inject`` would do to the model can be done to its shell: to read an adapter file into a bank
without touching the model (the shell shares the weights), or to see which tensors, of which
shapes, an adapter config makes for the model before anything is allocated (a shell on the meta
device)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..modules import TiedLoRALinear
from .inject import ROOT_ATTR, _layout_of, _weights_read_by_parent, model_embedding


class _LinearShell(nn.Linear):
    """An ``nn.Linear`` around an existing weight and bias (shared, not copied)."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter]):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias


class _ReadByParentShell(_LinearShell, NonDynamicallyQuantizableLinear):
    """The shell of a linear whose parent reads its weight without calling it (``nn.MultiheadAttention``'s
    ``out_proj``): of the class ``inject`` recognises such layers by, so the shell's targets are the model's."""


class Conv1D(nn.Module):
    """HF ``Conv1D``'s shape (weight (K, N)) around an existing weight: ``inject`` recognises layers of
    that name, so a shell of a GPT-2-style model gets the same kinds as the model."""

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter]):
        super().__init__()
        self.nf = weight.shape[1]
        self.weight, self.bias = weight, bias


class _ShellRoot(nn.Module):
    """The shell's root; like a transformers model it names its output head, which ``"all-linear"``
    leaves out (so the shell's targets are the model's)."""

    def __init__(self):
        super().__init__()
        self.output_head_name: Optional[str] = None

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return None if self.output_head_name is None else self.get_submodule(self.output_head_name)


def linear_shell(model: nn.Module, meta: bool = False) -> nn.Module:
    """A module tree with a linear shell at the path of every linear layer of ``model`` (adapted or
    not: a layer's kind depends on all of them) and nothing else: sharing the weights, or with
    ``meta`` weights of their shapes on the meta device (an ``inject`` into it allocates nothing)."""
    def stand_in(t: Optional[torch.Tensor]) -> Optional[nn.Parameter]:
        if t is None or not meta:
            return t
        return nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"), requires_grad=False)

    classes: dict = {}

    def container(module: nn.Module) -> nn.Module:
        # An empty module whose class has the original's name: inject tells routers by their class's
        # name (HunYuan's ``gate``, a HunYuanMoEV1Gate), so the shell's targets are the model's.
        name = type(module).__name__
        if name not in classes:
            classes[name] = type(name, (nn.Module,), {"__doc__": f"Shell of a {name}."})
        return classes[name]()

    root = _ShellRoot()
    head = model_embedding(model, "output")
    read_by_parent = _weights_read_by_parent(model)
    for name, module in model.named_modules():
        if not name or name == ROOT_ATTR or name.startswith(ROOT_ATTR + "."):
            continue
        if module is head:  # (a container of heads too: MusicGen's ModuleList gets its path below)
            root.output_head_name = name
        layout = module.layout if isinstance(module, TiedLoRALinear) else _layout_of(module)
        if layout == "linear":
            cls = _ReadByParentShell if name in read_by_parent else _LinearShell
            shell = cls(stand_in(module.weight), stand_in(module.bias))
        elif layout == "conv1d":
            shell = Conv1D(stand_in(module.weight), stand_in(module.bias))
        elif layout is not None and hasattr(module, "in_features"):
            # a quantized layer: it names kinds like any other; a weight of its shape on the meta device
            # stands in (never read)
            weight = nn.Parameter(torch.empty(module.out_features, module.in_features, device="meta"),
                                  requires_grad=False)
            shell = _LinearShell(weight, None)
        else:
            continue
        parent = root
        *path, leaf = name.split(".")
        for depth, part in enumerate(path):
            if part not in parent._modules:
                parent.add_module(part, container(model.get_submodule(".".join(path[:depth + 1]))))
            parent = parent._modules[part]
        parent.add_module(leaf, shell)
    return root
