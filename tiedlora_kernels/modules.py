"""Drop-in modules: an adapted ``nn.Linear`` / HF ``Conv1D`` and the holder of tied factors.

Ownership (why it looks like this): tied A and B are shared by every layer of a kind, so they
must be registered exactly once for ``model.parameters()``, optimizers, DDP and ``state_dict``
to see the true set. They live in one :class:`TiedFactors` per kind, all held by one
:class:`AdapterFactors` container attached to the model root (``model.tiedlora``). Each
:class:`TiedLoRALinear` keeps a plain, unregistered reference to its kind's factors, and
registers only what is its own: the frozen base ``weight``/``bias`` (same parameter objects,
same ``state_dict`` keys as the layer it replaced) and its per-layer ``adapter_u``/``adapter_v``.
Untied adapters (plain LoRA) are the same mechanism with one :class:`TiedFactors` per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import reference
from .ops import tied_lora_linear

#: ``weight_layout`` values: ``nn.Linear`` stores W as (N, K); HF ``Conv1D`` stores W^T as (K, N).
LAYOUTS = ("linear", "conv1d")


class TiedFactors(nn.Module):
    """The A (r, K_max) and B (N_max, r) of one kind (tied) or of one layer (untied).

    A layer with K <= K_max inputs and N <= N_max outputs uses the leading slices
    ``A[:, :K]`` and ``B[:N, :]`` (PEFT VeRA's rule for kinds whose layers differ in shape).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, train_A: bool, train_B: bool):
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=train_A)
        self.B = nn.Parameter(B, requires_grad=train_B)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def slices(self, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, K), B (N, r)) for a layer of that size: views, so gradients reach the full tensors."""
        A = self.A if self.A.shape[1] == in_features else self.A[:, :in_features]
        B = self.B if self.B.shape[0] == out_features else self.B[:out_features, :]
        return A, B

    def extra_repr(self) -> str:
        return (f"A={tuple(self.A.shape)}{'' if self.A.requires_grad else ' frozen'}, "
                f"B={tuple(self.B.shape)}{'' if self.B.requires_grad else ' frozen'}")


class AdapterFactors(nn.ModuleDict):
    """All :class:`TiedFactors` of a model, keyed by group name (the kind, or the layer path for
    untied adapters, with ``.`` written as ``__``). Attached to the model root as ``model.tiedlora``."""


class TiedLoRALinear(nn.Module):
    """``out = x W^T + b + s * (((dropout(x) A^T) * u) B^T) * v``, a drop-in for ``nn.Linear`` / ``Conv1D``.

    Args:
        weight: the frozen base weight parameter, (N, K) for ``layout="linear"``, (K, N) for
            ``layout="conv1d"`` (kept as is, so ``state_dict`` keys and shapes do not change).
        bias: (N,) parameter or None.
        factors: the kind's :class:`TiedFactors` (referenced, not registered here).
        u: (r,) parameter or None (constant 1). v: (N,) parameter or None (constant 1).
        scaling: s. dropout: adapter-input dropout probability.
        kind: the layer kind (name suffix) this layer is tied by.
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, layout: str,
                 factors: TiedFactors, u: Optional[nn.Parameter], v: Optional[nn.Parameter],
                 scaling: float, dropout: float, kind: str):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"TiedLoRALinear: layout must be one of {LAYOUTS}, got {layout!r}")
        self.weight = weight
        self.bias = bias
        self.layout = layout
        self.adapter_u = u
        self.adapter_v = v
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.kind = kind
        self.merged = False
        # A plain attribute, not a submodule: the factors are registered once, on the model root.
        object.__setattr__(self, "_factors", factors)

    @property
    def factors(self) -> TiedFactors:
        return self._factors

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] if self.layout == "linear" else self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0] if self.layout == "linear" else self.weight.shape[1]

    @property
    def rank(self) -> int:
        return self._factors.rank

    def weight_nk(self) -> torch.Tensor:
        """The base weight as (N, K): a transposed view for ``Conv1D`` (no copy)."""
        return self.weight if self.layout == "linear" else self.weight.t()

    def adapter_tensors(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(A (r, K), B (N, r), u (r,) or None, v (N,) or None) as this layer uses them."""
        A, B = self._factors.slices(self.in_features, self.out_features)
        return A, B, self.adapter_u, self.adapter_v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight_nk(), self.bias)
        A, B, u, v = self.adapter_tensors()
        return tied_lora_linear(x, self.weight_nk(), self.bias, A, B, u, v, self.scaling,
                                self.dropout, self.training)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (fp32 arithmetic, weight dtype kept)."""
        if self.merged:
            return
        self._set_weight_nk(reference.merged_weight(self.weight_nk(), *self.adapter_tensors(), self.scaling))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (subtracts the same fp32 delta)."""
        if not self.merged:
            return
        self._set_weight_nk(reference.unmerged_weight(self.weight_nk(), *self.adapter_tensors(), self.scaling))
        self.merged = False

    def _set_weight_nk(self, w_nk: torch.Tensor) -> None:
        if self.weight.is_meta:
            raise RuntimeError("TiedLoRALinear.merge: the base weight is on the meta device (not allocated); "
                               "load real weights before merging")
        self.weight.copy_(w_nk if self.layout == "linear" else w_nk.t())

    def extra_repr(self) -> str:
        u = "u" if self.adapter_u is not None else "-"
        v = "v" if self.adapter_v is not None else "-"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"kind={self.kind!r}, layout={self.layout}, scaling={self.scaling:g}, {u}{v}, "
                f"dropout={self.dropout:g}, merged={self.merged}")
