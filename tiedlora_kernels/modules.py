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

import contextlib
import sys
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from . import reference
from .bases import QuantizedBase, warn_requantized
from .ops import tied_lora_add, tied_lora_linear
from .reference import at_least_fp32

#: ``weight_layout`` values: ``nn.Linear`` stores W as (N, K); HF ``Conv1D`` stores W^T as (K, N);
#: ``quantized``: a base layer that computes its own output (``base_layer``, see ``bases.py``).
LAYOUTS = ("linear", "conv1d", "quantized")


class TiedFactors(nn.Module):
    """The factors of one kind (tied) or of one layer (untied).

    ``A`` is (r, K_max) and ``B`` (N_max, r); with partial tying they are banks (kA, r, K_max)
    and (kB, N_max, r) that each layer mixes with its own weights. ``core_bank`` is the tied
    LM (k, r, r) of tensor embedding adaptation, else None. A layer with K <= K_max inputs and
    N <= N_max outputs uses the leading slices (PEFT VeRA's rule for kinds whose layers differ).
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, train_A: bool, train_B: bool,
                 core_bank: Optional[torch.Tensor] = None):
        super().__init__()
        self.A = nn.Parameter(A, requires_grad=train_A)
        self.B = nn.Parameter(B, requires_grad=train_B)
        self.core_bank = None if core_bank is None else nn.Parameter(core_bank)
        self._fp32_views: dict[str, tuple] = {}  # name -> (factor, its version, its fp32 cast) of the last pass
        self._pass_running = False  # between the pass's start and end (eager only)
        self._cast_live = False  # the casts serve the running pass or its backward (what compiled code reads)
        self._used_with_grad: set[str] = set()  # factors the forward of this pass used with grad

    def new_forward_pass(self) -> None:
        """Start of a forward pass of the model (:class:`AdapterFactors`' hooks): one fp32 cast of each
        trained 16-bit factor, shared by every layer of this pass (:meth:`accumulating`). Made here,
        outside any activation-checkpointed region (a compiled checkpoint region may not write the
        cache); a factor that is not a parameter (``functional_call``'s fast weights, ``torch.func``)
        is cast too and used while it is the one the layers see."""
        if not torch.is_grad_enabled():  # a no-grad forward (DPO's reference logits) uses no cast, and
            return                       # keeps the casts a pending backward needs
        self._fp32_views.clear()
        compiling = torch.compiler.is_compiling()
        self._cast_live = True
        if not compiling:
            self._used_with_grad.clear()
            self._pass_running = True
        for name in ("A", "B", "core_bank"):
            p = getattr(self, name)
            if p is not None and p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
                cast = p.float()
                self._fp32_views[name] = (p, _version(p), cast)
                if not compiling:
                    cast.register_hook(_ForgetCast(self, name, cast))

    def end_forward_pass(self, backward_may_follow: bool = True) -> None:
        """End of the forward pass. An eager pass keeps its casts for its backward: a checkpointed
        segment recomputed there must run as its forward did (a compiled segment that took the cast as
        an input in the forward and casts by itself in the recompute saves other tensors, and the
        checkpoint fails). Between the pass and its backward they serve no one (``_cast_live``: a
        compiled block called on its own after an optimizer step must not read them); the backward
        revives them (:class:`_BackwardStarts`) and drops each once it has passed it
        (:class:`_ForgetCast`). Dropped here where no backward can follow (a forward that raised, or
        whose outputs require no grad), by the next pass, and under torch.compile (whose recompute
        runs inside the compiled graph). A no-grad pass started nothing, and ends nothing."""
        if not torch.is_grad_enabled():
            return
        self._cast_live = False
        if torch.compiler.is_compiling():
            self._fp32_views.clear()
            return
        self._pass_running = False
        if not backward_may_follow:
            self._fp32_views.clear()

    def backward_starts(self) -> None:
        """The backward of this pass's outputs has started: its casts serve its recomputes again."""
        self._cast_live = bool(self._fp32_views) and bool(self._used_with_grad)

    @property
    def rank(self) -> int:
        return self.A.shape[-2]

    @property
    def banked(self) -> bool:
        return self.A.dim() == 3

    def accumulating(self, name: str) -> torch.Tensor:
        """The factor as the layers should use it. A trained bf16/fp16 factor is replaced by the one
        fp32 cast made at the start of this forward pass (:meth:`new_forward_pass`), shared by every
        layer of the kind: each layer's gradient is added into that fp32 tensor and the sum is
        rounded to the parameter's dtype once (used directly, autograd would add the per-layer
        gradients in bf16).

        A non-reentrant checkpoint's recompute in the pass's backward uses the pass's cast, as its
        forward did. Outside a pass (a layer called on its own) and for a factor computed anew at each
        access (a parametrization) each call casts by itself: always current."""
        p = getattr(self, name)
        if p.dtype in (torch.float32, torch.float64) or not (p.requires_grad and torch.is_grad_enabled()):
            return p
        shared = self._fp32_views.get(name)
        if torch.compiler.is_compiling():
            # A compiled region guards on what it reads: the presence and identity of the cast and whether
            # it serves a pass or its backward (a guard on the version, which every optimizer step moves,
            # recompiled it each step until torch.compile gave up).
            return shared[2] if shared is not None and shared[0] is p and self._cast_live else p.float()
        in_backward = torch._C._current_graph_task_id() != -1
        reentrant = in_backward and _in_reentrant_checkpoint()
        if not in_backward:
            self._used_with_grad.add(name)
        elif reentrant or name not in self._used_with_grad:
                # A recompute inside the backward of a segment that is then run on its own (reentrant
                # checkpointing: torch's, detected from the running node, or any other whose forward
                # ran without grad): each segment adds its part into the 16-bit .grad by itself.
                warnings.warn(f"TiedFactors: the trained {p.dtype} tied factor {name!r} under reentrant activation "
                              "checkpointing: each checkpointed segment's gradient is rounded to "
                              f"{p.dtype} before the segments are summed, not summed in fp32. Use "
                              "use_reentrant=False (transformers: gradient_checkpointing_enable("
                              "gradient_checkpointing_kwargs={'use_reentrant': False})) or fp32 adapters.",
                              stacklevel=4)
        # The pass's cast, in the pass or in its backward (a non-reentrant checkpoint's recompute; a
        # reentrant one backpropagates each segment on its own), while it is the factor the layer sees,
        # unwritten since (an in-place write within the pass, a step of an inner training loop, moves
        # the version). A layer called on its own after the pass casts by itself.
        current = (shared is not None and shared[0] is p and shared[1] == _version(p)
                   and (self._pass_running or (in_backward and not reentrant)))
        return shared[2] if current else p.float()

    def __getstate__(self):
        # The casts are graph nodes of a running forward: never copied or pickled with the module.
        return {**self.__dict__, "_fp32_views": {}, "_pass_running": False, "_cast_live": False,
                "_used_with_grad": set()}

    def slices(self, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (.., r, K), B (.., N, r)) for a layer of that size: views, so gradients reach the full tensors."""
        A, B = self.accumulating("A"), self.accumulating("B")
        A = A if A.shape[-1] == in_features else A[..., :in_features]
        B = B if B.shape[-2] == out_features else B[..., :out_features, :]
        return A, B

    def extra_repr(self) -> str:
        bank = "" if self.core_bank is None else f", core_bank={tuple(self.core_bank.shape)}"
        return (f"A={tuple(self.A.shape)}{'' if self.A.requires_grad else ' frozen'}, "
                f"B={tuple(self.B.shape)}{'' if self.B.requires_grad else ' frozen'}{bank}")


def _in_reentrant_checkpoint() -> bool:
    """Whether the running backward node is ``torch.utils.checkpoint``'s reentrant recompute."""
    from torch.utils.checkpoint import CheckpointFunction

    return isinstance(torch._C._current_autograd_node(), CheckpointFunction._backward_cls)


class _ForgetCast:
    """Gradient hook on a pass's fp32 cast: it runs once every layer's gradient has been added into the
    cast, after the last recompute that needs it, and drops the cast (weak references: the hook keeps
    neither the cast nor the factors alive)."""

    def __init__(self, factors: TiedFactors, name: str, cast: torch.Tensor):
        self.factors, self.name, self.cast = weakref.ref(factors), name, weakref.ref(cast)

    def __call__(self, grad: torch.Tensor) -> None:
        factors = self.factors()
        shared = None if factors is None else factors._fp32_views.get(self.name)
        if shared is not None and shared[2] is self.cast():
            del factors._fp32_views[self.name]
            if not factors._fp32_views:
                factors._cast_live = False


class _BackwardStarts:
    """Gradient hook on a pass's outputs: the first node a backward of them runs revives the pass's
    casts, and the end of that backward retires them (a backward that never reaches a cast, towards
    the inputs only, drops none: they serve no later call all the same). Weak references."""

    def __init__(self, factors: "AdapterFactors"):
        self.factors = weakref.ref(factors)

    def __call__(self, grad: torch.Tensor) -> None:
        factors = self.factors()
        if factors is None:
            return
        for f in factors.values():
            f.backward_starts()
        # (compiled autograd traces this hook, and allows queue_callback only fullgraph)
        if not torch.compiler.is_compiling():
            torch.autograd.Variable._execution_engine.queue_callback(self.backward_ends)

    def backward_ends(self) -> None:
        factors = self.factors()
        for f in factors.values() if factors is not None else ():
            f._cast_live = False


class AdapterFactors(nn.ModuleDict):
    """All :class:`TiedFactors` of a model, keyed by group name (the kind, or the layer path for
    untied adapters, with ``.`` written as ``__``). Attached to the model root as ``model.tiedlora``."""

    def watch(self, model: nn.Module) -> None:
        """Hook the forward of ``model`` and of every module a caller may run on its own that holds
        adapted layers (:func:`_entry_points`: ``model.model``, an encoder, CLIP's text model). A call
        of one that runs inside no other is a forward pass: it makes fresh shared fp32 casts of 16-bit
        trained factors and keeps them for its backward only (:meth:`TiedFactors.end_forward_pass`: dropped
        as that backward passes them, or at once when no output requires grad); a call nested inside it (``model.model`` inside
        the root, a T5 encoder and decoder) shares them. The pass belongs to its call's frame: a pass
        whose call is no longer on the stack (a forward interrupted by Ctrl-C, which skips the
        post-hooks; another thread's) is over, and the next call starts afresh. Under torch.compile
        (no frames to look at) each entry point's call is a pass of its own. Bound methods: the hooks
        survive deepcopy and pickling; blocks inside a ModuleList are not hooked, so a checkpointed
        block writes nothing."""
        self._pass_frame = None
        for module in _entry_points(model):
            module.register_forward_pre_hook(self.new_forward_pass)
            module.register_forward_hook(self.end_forward_pass, always_call=True)

    def new_forward_pass(self, module=None, args=None) -> None:
        if torch.compiler.is_compiling():
            for factors in self.values():
                factors.new_forward_pass()
            return
        # A checkpoint around the whole model recomputing it inside the backward starts no pass: that
        # backward still adds into the forward's casts.
        if torch._C._current_graph_task_id() != -1:
            return
        running = getattr(self, "_pass_frame", None)
        if running is not None and _on_stack(running, sys._getframe(2)):
            return  # nested in the running pass
        self._pass_frame = sys._getframe(1)  # the call's own frame (nn.Module._call_impl)
        for factors in self.values():
            factors.new_forward_pass()

    def end_forward_pass(self, module=None, args=None, output=None) -> None:
        if torch.compiler.is_compiling():
            for factors in self.values():
                factors.end_forward_pass()
            return
        running, caller = getattr(self, "_pass_frame", None), sys._getframe(1)
        # the post-hooks run in the frame the pre-hooks ran in, or, when the forward raised, in its caller
        # (nn.Module._call_impl's except branch): either way the pass's own call has ended
        if torch._C._current_graph_task_id() == -1 and running is not None and caller in (running, running.f_back):
            self._pass_frame = None
            # (a forward that raised runs its post-hooks in its caller's frame, with no output)
            outputs = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)
                       and t.requires_grad] if caller is running else []
            for factors in self.values():
                factors.end_forward_pass(backward_may_follow=bool(outputs))
            for t in outputs:
                t.register_hook(_BackwardStarts(self))

    def __getstate__(self):
        return {**self.__dict__, "_pass_frame": None}  # (a frame is no state, and cannot be pickled)


def _on_stack(frame, start) -> bool:
    """Whether ``frame`` is ``start`` or one of its callers (a nested call finds it a few frames up)."""
    while start is not None:
        if start is frame:
            return True
        start = start.f_back
    return False


def _version(p: torch.Tensor) -> int:
    """The in-place version of ``p`` (0 under torch.compile, which cannot trace it: there the pass
    boundaries alone keep the casts current)."""
    return 0 if torch.compiler.is_compiling() else p._version


def _entry_points(model: nn.Module) -> list[nn.Module]:
    """``model`` and every module inside it that holds adapted layers and that a caller may run on its
    own: not a container of blocks (ModuleList, ModuleDict, Sequential) nor inside one, not an adapted
    layer. A few modules per model (LLaMA: the root and ``model``), not one per block."""
    containers = (nn.ModuleList, nn.ModuleDict, nn.Sequential, TiedLoRALinear, AdapterFactors)
    out = [model]

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if not isinstance(child, containers) and any(isinstance(m, TiedLoRALinear) for m in child.modules()):
                out.append(child)
                visit(child)

    visit(model)
    return out


class TiedLoRALinear(nn.Module):
    """A drop-in for ``nn.Linear`` / ``Conv1D`` carrying one adapter of the Tied-LoRA family.

    Every variant reduces to the one fused op on *effective* tensors (A_i, B_i, u_i, v_i), plus
    an optional per-row output scale c (DoRA's magnitude):

        out = c * (x W^T + s * (((dropout(x) A_i^T) * u_i) B_i^T) * v_i) + b

    - plain / tied: A_i, B_i are the kind's A, B (leading slices);
    - partial tying: A_i = sum_k wA[k] LA[k], B_i = sum_k wB[k] LB[k];
    - Tied-LoRA Extra / tensor embedding: B_i = B M_i with M_i = ``adapter_M`` or
      sum_k ``adapter_wM``[k] LM[k] (so z B^T with z = h M_i^T costs one r x r product, folded
      into B once per call: N r^2 flops, nothing per token);
    - DoRA: c = m / ||W + dW||_row (detached), bias added after the scale;
    - Simple DoRA: c = m / ||W||_row and v_i multiplied by ||W||_row, which is
      (x W0^T + s dW x) * m with W0 = W / ||W||_row, without rewriting the frozen weight.

    Over a quantized base (``layout="quantized"``) the base layer is kept whole as ``base_layer``
    and computes its own output; the adapter is added by ``tied_lora_add`` (``state_dict`` keys of
    the base move under ``<name>.base_layer.``, as PEFT's do).

    Args:
        weight: the frozen base weight parameter, (N, K) for ``layout="linear"``, (K, N) for
            ``layout="conv1d"`` (kept as is, so ``state_dict`` keys and shapes do not change);
            None for ``layout="quantized"``.
        bias: (N,) parameter or None (None for ``layout="quantized"``: the base layer adds its own).
        factors: the kind's :class:`TiedFactors` (referenced, not registered here).
        per_layer: this layer's own adapter parameters, any of ``adapter_u`` (r,), ``adapter_v``
            (N,), ``adapter_wA`` (kA,), ``adapter_wB`` (kB,), ``adapter_M`` (r, r), ``adapter_wM``
            (k,), ``adapter_m`` (N,).
        magnitude: ``none``, ``dora`` or ``simple_dora``.
        scaling: s. dropout: adapter-input dropout probability.
        kind: the layer kind (name suffix) this layer is tied by.
        base_layer, base_kind: for ``layout="quantized"``, the quantized layer and its
            :class:`~tiedlora_kernels.bases.QuantizedBase`.
    """

    PER_LAYER = ("adapter_u", "adapter_v", "adapter_wA", "adapter_wB", "adapter_M", "adapter_wM", "adapter_m")

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], *, layout: str,
                 factors: TiedFactors, per_layer: dict, scaling: float, dropout: float, kind: str,
                 magnitude: str = "none", base_layer: Optional[nn.Module] = None,
                 base_kind: Optional[QuantizedBase] = None):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"TiedLoRALinear: layout must be one of {LAYOUTS}, got {layout!r}")
        if (layout == "quantized") != (base_layer is not None and base_kind is not None):
            raise ValueError("TiedLoRALinear: layout='quantized' needs base_layer and base_kind (and only it)")
        unknown = set(per_layer) - set(self.PER_LAYER)
        if unknown:
            raise ValueError(f"TiedLoRALinear: unknown per-layer parameters {sorted(unknown)}")
        self.weight = weight
        self.bias = bias
        self.base_layer = base_layer
        self.base_kind = base_kind
        self.layout = layout
        for name in self.PER_LAYER:
            setattr(self, name, per_layer.get(name))
        self.magnitude = magnitude
        # Derived tensors kept inside ``cached_adapters`` (None: not in that context, recompute).
        self._frozen_cache: Optional[dict] = None
        self.scaling = float(scaling)
        self.dropout = float(dropout)
        self.kind = kind
        self.merged = False
        # Multi-adapter serving: inside ``AdapterBank.use(...)`` the bank computes this layer's output,
        # each row with its own adapter (see tiedlora_kernels/serving.py); None otherwise.
        self.bank_route = None
        # A plain attribute, not a submodule: the factors are registered once, on the model root.
        object.__setattr__(self, "_factors", factors)

    @property
    def factors(self) -> TiedFactors:
        return self._factors

    @property
    def in_features(self) -> int:
        if self.layout == "quantized":
            return self.base_kind.in_out(self.base_layer)[0]
        return self.weight.shape[1] if self.layout == "linear" else self.weight.shape[0]

    @property
    def out_features(self) -> int:
        if self.layout == "quantized":
            return self.base_kind.in_out(self.base_layer)[1]
        return self.weight.shape[0] if self.layout == "linear" else self.weight.shape[1]

    @property
    def rank(self) -> int:
        return self._factors.rank

    def weight_nk(self) -> torch.Tensor:
        """The base weight as (N, K): a transposed view for ``Conv1D`` (no copy); for a quantized
        base, its dequantized weight (a new tensor: merge, DoRA's row norms)."""
        if self.layout == "quantized":
            return self.base_kind.dequantized_weight(self.base_layer)
        return self.weight if self.layout == "linear" else self.weight.t()

    def adapter_tensors(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The effective (A_i (r, K), B_i (N, r), u_i (r,) or None, v_i (N,) or None) of this layer."""
        return self.op_tensors()[:4]

    def op_tensors(self) -> tuple:
        """(A_i, B_i, u_i, v_i, c): the effective tensors and the row scale (c (N,) or None) the fused
        op takes for this layer; Simple DoRA's ||W||_row is computed once for both v_i and c. Computed
        in the adapters' own dtype even under torch.autocast (which would run the einsums and the
        DoRA norm in its lower dtype)."""
        with reference.autocast_off(self._factors.A.device.type):
            return self._derived("effective", self._effective_tensors)

    def _effective_tensors(self):
        # What a layer derives (partial tying's mixtures, Extra's B M_i, Simple DoRA's v * ||W||) is formed
        # in fp32 at least, with or without grad: 16-bit factors used raw without grad (eval, generate)
        # rounded A_i, B_i to bf16, ~100x the error of the same forward with grad.
        A, B = self._factors.slices(self.in_features, self.out_features)
        if self._factors.banked:
            A = torch.einsum("k,krK->rK", at_least_fp32(self.adapter_wA), at_least_fp32(A))
            B = torch.einsum("k,kNr->Nr", at_least_fp32(self.adapter_wB), at_least_fp32(B))
        M = self.adapter_M
        if self.adapter_wM is not None:
            core = self._factors.accumulating("core_bank")  # tied: its gradient summed in fp32
            M = torch.einsum("k,krs->rs", at_least_fp32(self.adapter_wM), at_least_fp32(core))
        if M is not None:
            B = at_least_fp32(B) @ at_least_fp32(M)
        u, v, c, m = self.adapter_u, self.adapter_v, None, self.adapter_m
        if self.magnitude == "simple_dora":  # v_i = v * ||W||, c = m / ||W|| (a zero row: 1 for ||W||)
            n = reference.direction_norm(self.base_row_norm())
            v = n if v is None else at_least_fp32(v) * n
            c = reference.dora_row_scale(m, n)
        elif self.magnitude == "dora":  # c = m / ||W + dW||_row, the norm detached (paper, PEFT)
            with torch.no_grad():
                n = reference.merged_row_norm(self.weight_nk(), A, B, u, v, self.scaling)
            c = reference.dora_row_scale(m, n)
        return A, B, u, v, c

    def base_row_norm(self) -> torch.Tensor:
        """||W||_row (N,) of the frozen base weight, fp32: Simple DoRA's W0 = W / norm without
        rewriting W. Computed from the weight as it is at each call (loaded, materialised from the
        meta device, pruned, parametrized: never stale; one N x K pass, ~1% of a training step's
        GEMMs), never from a merged weight."""
        if self.merged:  # on the magnitude's device (a model moved after merging); no dequantization
            return self._merged_base_norm.to(self.adapter_m.device)
        with torch.no_grad():
            return reference.row_norm(self.weight_nk())

    def _derived(self, slot: str, compute):
        """``compute()``; inside :func:`cached_adapters` without grad, computed once and kept.

        Outside that context nothing is kept: a cache keyed on tensor versions goes stale under
        writes that do not move them (fused optimizers, ``.data``, collectives, re-parametrized
        weights), so reuse is only offered where the caller promises the adapter does not change."""
        cache = self._frozen_cache
        if cache is None or torch.is_grad_enabled():
            return compute()
        if slot not in cache:
            cache[slot] = compute()
        return cache[slot]

    def __getstate__(self):
        # Derived tensors belong to one cached_adapters context, routes to one bank context: never
        # copied or pickled.
        return {**self.__dict__, "_frozen_cache": None, "bank_route": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bank_route is not None:
            return self.bank_route(self, x)
        if self.layout == "quantized":
            return self._forward_quantized(x)
        if self.merged:
            self._warn_if_training_merged()
            return nn.functional.linear(x, self.weight_nk(), self.bias)
        A, B, u, v, c = self.op_tensors()
        # The magnitude c is the op's row scale: applied in the kernels' epilogue, before the bias.
        return tied_lora_linear(x, self.weight_nk(), self.bias, A, B, u, v, self.scaling, self.dropout,
                                self.training, row_scale=c)

    def _forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's own output (its dequantizing GEMM and autograd), then the adapter term added
        in one pass; with a row scale c, out = c * (base - b + adapter) + b (as PEFT's DoRA does)."""
        base_out = self.base_kind.forward(self.base_layer, x)
        if self.merged:
            self._warn_if_training_merged()
            return base_out
        A, B, u, v, c = self.op_tensors()
        bias = None
        if c is not None and self.base_layer.bias is not None:
            bias = self.base_layer.bias.to(base_out.dtype)
            base_out = base_out - bias
        return tied_lora_add(x, base_out, bias, A, B, u, v, self.scaling, self.dropout, self.training, row_scale=c)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight: W' = c * (W + dW) (fp32 arithmetic, weight dtype kept)."""
        if self.merged:
            return
        A, B, u, v, c = self.op_tensors()
        # What unmerge needs, kept as plain tensors (not buffers) so that a later model.to(dtype)
        # cannot round them: the original weight's norm (Simple DoRA) and the row scale c.
        if self.magnitude == "simple_dora":
            self._merged_base_norm = self.base_row_norm()
        if c is not None:
            self._merged_row_scale = at_least_fp32(c.detach()).clone()
            c = self._merged_row_scale
            # rows with c = 0 merge to zero and cannot be divided back, and Simple DoRA's zero (pruned) rows
            # come back as rounding residue that ||W||_row would blow up to a unit direction: keep their originals
            lost = c == 0
            if self.magnitude == "simple_dora":
                lost |= self._merged_base_norm.to(c.device) == 0
            lost = lost.nonzero().flatten()
            if len(lost):
                self._merged_lost_rows = (lost, self.weight_nk()[lost].clone())
        w = reference.merged_weight(self.weight_nk(), A, B, u, v, self.scaling, row_scale=c)
        self._set_weight_nk(w)
        self.merged = True
        self._forget_derived()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (divides by the stored c, subtracts the same fp32 delta)."""
        if not self.merged:
            return
        c = self._merged_row_scale if self.magnitude != "none" else None
        A, B, u, v = self.adapter_tensors()
        w = reference.unmerged_weight(self.weight_nk(), A, B, u, v, self.scaling, row_scale=c)
        lost = self.__dict__.pop("_merged_lost_rows", None)
        if lost is not None:
            w[lost[0]] = lost[1].to(w.device, w.dtype)
        self._set_weight_nk(w)
        if c is not None:
            del self._merged_row_scale
        if self.magnitude == "simple_dora":
            del self._merged_base_norm
        self.merged = False
        self._forget_derived()

    def _forget_derived(self) -> None:
        """Inside :func:`cached_adapters`: drop what was derived from the weight before merge/unmerge
        rewrote it (unmerge derives DoRA's row scale from the merged weight)."""
        if self._frozen_cache is not None:
            self._frozen_cache.clear()

    def _warn_if_training_merged(self) -> None:
        """A merged layer computes its adapter inside the base weight: in training with grad, its
        adapter tensors would get no gradient, silently. (Not under torch.compile: a warning is not traced.)"""
        if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return
        own = (getattr(self, n) for n in self.PER_LAYER)
        if self._factors.A.requires_grad or self._factors.B.requires_grad or any(
                p is not None and p.requires_grad for p in own):
            warnings.warn("TiedLoRALinear: a merged layer runs in training mode with grad enabled; its adapter "
                          "gets no gradient from it. Call tiedlora_kernels.unmerge(model) before training.",
                          stacklevel=3)

    def _set_weight_nk(self, w_nk: torch.Tensor) -> None:
        if self.layout == "quantized":
            warn_requantized("merging into" if not self.merged else "unmerging from")
            self.base_kind.replace_weight(self.base_layer, w_nk)
            return
        if self.weight.is_meta:
            raise RuntimeError("TiedLoRALinear.merge: the base weight is on the meta device (not allocated); "
                               "load real weights before merging")
        self.weight.copy_(w_nk if self.layout == "linear" else w_nk.t())

    def extra_repr(self) -> str:
        own = ",".join(n.removeprefix("adapter_") for n in self.PER_LAYER if getattr(self, n) is not None) or "-"
        layout = self.layout if self.layout != "quantized" else f"quantized ({self.base_kind.name})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"kind={self.kind!r}, layout={layout}, scaling={self.scaling:g}, per_layer={own}, "
                f"magnitude={self.magnitude}, dropout={self.dropout:g}, merged={self.merged}")


@contextlib.contextmanager
def cached_adapters(model: nn.Module):
    """Inference context: each adapted layer computes its derived tensors (partial tying's A_i / B_i,
    Extra's B M_i, Simple DoRA's v * ||W||, DoRA's ||W + dW||_row) once, on first use without grad,
    and reuses them until the context exits. For serving and ``generate`` loops over an unmerged
    adapter, where these would otherwise cost small launches (and DoRA an N x K pass) per layer per
    step. Do not change the base weights, the adapter, or ``scaling`` inside the context; forwards
    with grad enabled inside it recompute as usual.

    Example:
        >>> with torch.no_grad(), cached_adapters(model):
        ...     tokens = model.generate(prompt, max_new_tokens=64)
    """
    layers = [m for m in model.modules() if isinstance(m, TiedLoRALinear)]
    for layer in layers:
        layer._frozen_cache = {}
    try:
        yield model
    finally:
        for layer in layers:
            layer._frozen_cache = None

