"""Base layers that compute their own output: quantized linears (QLoRA-style training).

An adapted layer over a dense ``nn.Linear`` / HF ``Conv1D`` runs the whole layer in one op (the base
GEMM on cuBLAS). Over a quantized layer the base keeps its own dequantizing GEMM and its own
autograd for dx; the adapter adds its term with :func:`tiedlora_kernels.ops.tied_lora_add` (one pass
over x, one read of the base output, one write). What the adapted layer needs from such a base is
small, and each kind is one :class:`QuantizedBase` subclass: another kind (torchao int4/int8
weight-only, fp8 linears) is one more class in :data:`QUANTIZED_BASES`, no change to the ops.

bitsandbytes is optional: nothing here imports it unless a model already holds its layers.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from typing import Optional

import torch
import torch.nn as nn


class QuantizedBase:
    """How an adapted layer uses one kind of quantized base layer (stateless; one instance per kind)."""

    #: Shown in errors and ``extra_repr``.
    name = "quantized"

    def matches(self, module: nn.Module) -> bool:
        """True when ``module`` is a layer of this kind."""
        raise NotImplementedError

    def in_out(self, module: nn.Module) -> tuple[int, int]:
        """(in_features K, out_features N)."""
        return module.in_features, module.out_features

    def prepare(self, module: nn.Module) -> None:
        """Called by ``inject`` for every layer of this kind in the model, adapted or not (a layer
        below an adapter must pass its input's gradient): any one-time set-up the kind needs."""

    def not_ready(self, module: nn.Module) -> Optional[str]:
        """Why an adapter cannot be put on this layer yet (checked by ``inject`` before any change), or None."""
        return None

    def forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output (..., N) for x, its bias included, in x's dtype, differentiable in x."""
        return module(x)

    def dequantized_weight(self, module: nn.Module) -> torch.Tensor:
        """W (N, K) as the layer computes with it, floating point (merge, DoRA's row norms, references)."""
        raise NotImplementedError

    def replace_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (N, K) into the layer in place of its weight (merge / unmerge)."""
        raise NotImplementedError


def _bnb():
    """The bitsandbytes module when it is already imported (a model holding its layers imported it)."""
    return sys.modules.get("bitsandbytes")


class Bnb4bit(QuantizedBase):
    """``bitsandbytes.nn.Linear4bit`` (NF4 / FP4, as ``BitsAndBytesConfig(load_in_4bit=True)`` loads)."""

    name = "bitsandbytes.nn.Linear4bit"

    def matches(self, module):
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear4bit)

    def prepare(self, module):
        keep_standard_cpu_layout(module)

    def not_ready(self, module):
        if module.weight.quant_state is None:  # bitsandbytes quantizes a Linear4bit when it is moved
            return ("its weight is not quantized yet (bitsandbytes quantizes a Linear4bit when the model is moved: "
                    "call model.to(device) before inject)")
        return None

    def dequantized_weight(self, module):
        import bitsandbytes.functional as bf

        weight = module.weight
        data, state = weight.data, weight.quant_state
        # A layer not prepared (yet) may hold bitsandbytes' CPU layout; undoing it rewrites the state it
        # is given in place, which would leave the layer's packed weight with an unpacked state: a copy.
        if getattr(state, "packing_format_for_cpu", False):
            data, state = _unpacked_from_cpu_layout(data, copy.deepcopy(state))
        return bf.dequantize_4bit(data, state)

    def replace_weight(self, module, weight):
        import bitsandbytes as bnb

        old = module.weight
        kwargs = {k: v for k, v in old.__dict__.items() if k not in ("data", "quant_state", "bnb_quantized")}
        kwargs["requires_grad"] = False
        fresh = bnb.nn.Params4bit(weight.to("cpu", old.quant_state.dtype).contiguous(), **kwargs)
        module.weight = fresh.to(old.device)  # quantizes on the way (prepare keeps the standard layout)


class Bnb8bit(QuantizedBase):
    """``bitsandbytes.nn.Linear8bitLt`` with int8 weights (``BitsAndBytesConfig(load_in_8bit=True)``)."""

    name = "bitsandbytes.nn.Linear8bitLt"

    def matches(self, module):
        bnb = _bnb()
        return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)

    def prepare(self, module):
        # A layer whose weight holds int8 rows without their scales (PEFT's DoRA over 8-bit leaves
        # weight.CB set and weight.SCB None once it has run): bitsandbytes' next call would take the
        # missing scales as the layer's and fail inside its matmul; the scales are in its state
        weight, state = module.weight, module.state
        if getattr(weight, "CB", None) is not None and getattr(weight, "SCB", None) is None \
                and getattr(state, "SCB", None) is not None:
            weight.SCB = state.SCB

    def dequantized_weight(self, module):
        weight, state = module.weight, module.state
        CB = weight.CB if getattr(weight, "CB", None) is not None else state.CB
        SCB = weight.SCB if getattr(weight, "SCB", None) is not None else state.SCB
        if CB is None:
            # fp16 weights kept (has_fp16_weights=True): the layer quantizes them row-wise on every
            # call and computes with that, so that is the weight it has (DoRA's norms, merge)
            import bitsandbytes.functional as bf

            CB, SCB, _ = bf.int8_vectorwise_quant(weight.data.to(torch.float16))
        return CB.float() * (SCB.float()[:, None] / 127.0)

    def replace_weight(self, module, weight):
        import bitsandbytes as bnb

        old = module.weight
        # int8 weights are quantized from fp16; kept 16/32-bit weights (has_fp16_weights) keep their dtype
        dtype = old.dtype if old.has_fp16_weights else torch.float16
        fresh = bnb.nn.Int8Params(weight.to("cpu", dtype).contiguous(), requires_grad=False,
                                  has_fp16_weights=old.has_fp16_weights)
        module.weight = fresh.to(old.device)  # quantizes on the way
        module.state.reset_grads()
        module.state.CB = module.state.SCB = None


#: Class names of quantized layers and tensors: generic words (``quant``, ``Int8``, ``nf4``, ``fp8``,
#: ``4bit``) and libraries (HQQ, GPTQ, AWQ / AutoAWQ's ``WQLinear_*``, EETQ, HIGGS, BitNet's
#: ``BitLinear``, optimum-quanto's ``WeightQBytesTensor`` / ``WeightQBitsTensor``). ``int<bits>`` counts
#: only as a word of its own (``Int8Tensor``, ``int4_linear``), not inside one (``Joint3D``).
_QUANTIZED_TYPE_NAME = re.compile(r"(?:Int|INT|(?<![A-Za-z])int)[2-8]|(?i:quant|nf4|float[48]|fp[48]|[48]bit|"
                                  r"mx(?:fp|int|tensor)|hqq|gptq|awq|wqlinear|eetq|higgs|bitlinear|qbytes|qbits)")

#: ``nn.Linear`` subclasses with a forward of their own that still computes exactly x W^T + b:
#: adapted as dense layers (Falcon's adds the bias after the product, for its bf16 rounding).
DENSE_LINEAR_SUBCLASSES = ("FalconLinear",)

def keep_standard_cpu_layout(module: nn.Module) -> None:
    """bitsandbytes 0.50 repacks a ``Linear4bit`` weight for its CPU bf16 inference kernel on the first
    no-grad eval call (on avx512-bf16 CPUs). That kernel has no backward: a later training step
    drops the base layer's input gradient, with only a warning, so every adapter gradient below it
    is wrong. It also fails unless out_features is a multiple of 32 and in_features of the block
    size. So the repack is switched off, and a weight already repacked (an eval pass before
    ``inject``) is put back in the standard layout. ``inject`` calls it for every 4-bit layer of the
    model; other modules are left alone."""
    bnb = _bnb()
    if bnb is None or not isinstance(module, bnb.nn.Linear4bit):
        return
    module.support_avx512bf16_for_cpu = False
    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _unpacked_from_cpu_layout(weight.data, weight.quant_state)


def _unpacked_from_cpu_layout(data: torch.Tensor, state) -> tuple[torch.Tensor, object]:
    """(data, state) of a 4-bit weight in bitsandbytes' CPU layout, back in the standard one; ``state``
    is rewritten in place. bitsandbytes 0.50's own inverse restores the block scales' order only for
    double-quantized states; a plain state keeps them (K / block, N)-transposed, which dequantizes
    with the wrong scale for every block (2e-1 relative error): that order is restored here. The
    repack rounded the scales to bf16, which no inverse undoes (~1e-3)."""
    import bitsandbytes.functional as bf

    data, state = bf._convert_weight_packed_for_cpu_inverse(data, state)
    if not state.nested and state.absmax.dim() == 2:
        state.absmax = state.absmax.t().reshape(-1).to(torch.float32)
    return data, state


#: Every supported kind, checked in order.
QUANTIZED_BASES: tuple[QuantizedBase, ...] = (Bnb4bit(), Bnb8bit())


def quantized_base_of(module: nn.Module) -> Optional[QuantizedBase]:
    """The supported quantized kind of ``module``, or None (a dense layer, or not a linear at all)."""
    for kind in QUANTIZED_BASES:
        if kind.matches(module):
            return kind
    return None


def looks_quantized(module: nn.Module) -> bool:
    """True for a linear-like layer whose weight is not a plain floating tensor (int8/uint8/fp8 storage,
    or a quantized tensor subclass): such a layer must never be treated as a dense ``nn.Linear``."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if not weight.is_floating_point() or weight.element_size() < 2:
        return True
    # floating storage behind a quantizing tensor subclass (torchao's AffineQuantizedTensor, NF4Tensor, ...);
    # other subclasses (DTensor under FSDP2) are dense
    return _QUANTIZED_TYPE_NAME.search(type(weight).__name__) is not None


def has_own_forward(module: nn.Module) -> bool:
    """True for an ``nn.Linear`` subclass whose class overrides ``forward`` (BitNet's ``AutoBitLinear``
    scales and quantizes around the product), unless it is one of :data:`DENSE_LINEAR_SUBCLASSES`:
    an adapted layer computes x W^T + b itself, so it would drop whatever that forward adds."""
    return (isinstance(module, nn.Linear) and type(module).forward is not nn.Linear.forward
            and type(module).__name__ not in DENSE_LINEAR_SUBCLASSES)


def looks_like_quantized_linear(module: nn.Module) -> bool:
    """True for a module of another library that is a quantized linear layer without being an
    ``nn.Linear``: a quantizing class name and linear sizes (HQQ, GPTQ, AWQ, HIGGS, BitNet layers), or a
    linear or quantizing class name and a weight that is not floating point (EETQ's ``EetqLinear``,
    which has no sizes). Embeddings are no linear layers, quantized or not."""
    if isinstance(module, nn.Linear) or hasattr(module, "num_embeddings"):
        return False
    cls = type(module).__name__
    sized = any(hasattr(module, a) and hasattr(module, b) for a, b in (("in_features", "out_features"),
                                                                     ("infeatures", "outfeatures")))
    quantizing_name = _QUANTIZED_TYPE_NAME.search(cls) is not None
    return (sized and quantizing_name) or ((quantizing_name or "linear" in cls.lower()) and looks_quantized(module))


def unsupported_quantized_error(name: str, module: nn.Module) -> ValueError:
    supported = ", ".join(k.name for k in QUANTIZED_BASES)
    weight = getattr(module, "weight", None)
    what = f"{type(module).__module__}.{type(module).__name__}"
    if has_own_forward(module) and not looks_quantized(module):
        what = f"{what}, an nn.Linear subclass with a forward of its own"
    else:
        what = f"quantized {what}"
    detail = f" (weight {type(weight).__name__}, dtype {weight.dtype})" if isinstance(weight, torch.Tensor) else ""
    return ValueError(f"inject: layer {name!r} is a {what}{detail}, which tiedlora-kernels does not "
                      f"support; supported quantized base layers: {supported} (and dense nn.Linear / HF Conv1D)")


def warn_requantized(action: str) -> None:
    warnings.warn(f"{action} a quantized base layer: the weight is dequantized, changed in floating point and "
                  "quantized again, which rounds it (the result is not bit-exact, and unmerge does not restore the "
                  "original quantized weight exactly)", UserWarning, stacklevel=3)
