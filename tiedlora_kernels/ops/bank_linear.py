"""An adapted linear layer over a batch in which every row (sequence) has its own adapter: the op
behind :class:`tiedlora_kernels.serving.AdapterBank`. Inference only.

    a = slot of row m (-1: base model only)
    out[m] = x[m] W^T + b + ((x[m] A_a^T) * U[a]) B_a^T * V[a]                  (a >= 0)
    out[m] = x[m] W^T + b                                                       (a = -1)
    with a row scale C (S, N) (DoRA, Simple DoRA): out[m] = C[a] * (x[m] W^T + term) + b, C[-1] = 1

    A_a = A (R, K) shared, or A[a] of (S, R, K); B_a = B (N, R) shared, or B[a] of (S, N, R);
    U (S, R) is each slot's u times its scaling s; V (S, N) each slot's v (None: all 1).

Routes (``TIEDLORA_BACKEND``, as for :func:`tiedlora_kernels.tied_lora_linear`):

- GPU (Triton + cuBLAS): L = the rank-r term plus b in x's dtype, one pass over x, then
  ``L.addmm_(x, W^T)`` (cuBLAS, beta = 1), the single-adapter scheme. When A and B are shared the
  term is ``bank_term`` (one launch, no sort: rows gather their own U and V rows: the cost of one
  adapter); when either is per slot, ``bank_segment_term`` (rows grouped by slot into segments, each
  segment's factors read once, SGMV-style). A row scale adds one elementwise pass: b + y * C[a].
- torch: the same formula in plain torch (the gather formulation when the factors are shared, one
  product per segment otherwise), computed in the dtype (:func:`~tiedlora_kernels.validation.adapter_compute_dtype`)
  :func:`tiedlora_kernels.reference.tied_lora_linear` computes in.

Which slot each row uses is an :class:`AdapterRows`: the ids validated once (one host sync), the
row-to-slot maps and segment plans kept for every call made with them (a model's layers, the
prefill and each decode step of ``generate``), so a call adds no host sync. Which rows of x an
id covers: :meth:`AdapterRows.fit` (the batch, OPT's flattened tokens, an encoder run before
``generate`` expands the batch).

Under ``torch.autocast`` x, W and b are cast to the autocast dtype and the term keeps the factors'
dtype, as the single-adapter op (:func:`tiedlora_kernels.ops.tied_lora_linear`) does.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .. import reference
from ..validation import FLOAT_DTYPES, adapter_compute_dtype
from . import autocast_base, resolve_backend

#: ``AdapterRows``' id dtypes: any integer tensor (int64 or int32 usually).
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def same_device(a: Union[str, torch.device], b: Union[str, torch.device]) -> bool:
    """Whether ``a`` and ``b`` name one device: ``"cuda"`` is the current CUDA device (a tensor's
    device is ``cuda:0``), ``"cpu:0"`` the CPU (a tensor's is ``cpu``); ``==`` tells them apart."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and _device_index(a) == _device_index(b)


def _device_index(device: torch.device) -> int:
    if device.index is not None:
        return device.index
    backend = getattr(torch, device.type, None) if device.type not in ("cpu", "meta") else None
    if backend is not None and hasattr(backend, "current_device") and backend.is_available():
        return backend.current_device()
    return 0


#: The end of a refusal where x's rows do not follow the ids: the layer may not have one row group per
#: sequence at all.
_NOT_SEQUENCES = ("; or this layer's rows are not the batch's sequences (position embeddings shared by the "
                  "batch, as DeBERTa's; windows, as Swin's; a time-first layout): such a layer serves only a batch "
                  "whose sequences (or images, or clips) all use one adapter")


class CallFrame(NamedTuple):
    """The shape of a model call in progress (:attr:`AdapterRows.frames`): its batch, and its seq where
    its input gives one (None: an audio encoder's features). ``before_expansion``: the call is an
    encoder-decoder model's encoder called on its own, as ``generate`` calls it before expanding the
    batch for beams or returned sequences, so its batch may be the ids' over the copies. Inside a
    model call (a forward of the whole model) an encoder sees the batch the ids were given for."""

    batch: int
    seq: Optional[int]
    before_expansion: bool = False


class AdapterRows:
    """The adapter slot of every sequence (or token) of a batch, validated against a bank.

    Args:
        adapter_ids: (batch,) one slot per sequence, broadcast over its tokens (see :meth:`fit`),
            or (batch, seq), one per token (a layer with one row per sequence, a pooled layer such as
            BERT's pooler, takes one id per sequence: allowed where each sequence's ids are all
            equal); integer tensor on ``device`` (a list of ints is converted). -1 = the base model
            alone.
        capacity: number of slots S; ids must lie in [-1, S).
        occupied: which slots hold an adapter (None: all); an id naming an empty slot is refused.
        device: the device the layers run on; a tensor elsewhere is refused, not copied.
        names: slot -> adapter name, for error messages.

    Raises:
        TypeError / ValueError naming ``adapter_ids``: not an integer tensor, wrong rank, another
        device, an id out of range or naming an empty slot.
    """

    def __init__(self, adapter_ids, capacity: int, occupied: Optional[Sequence[bool]] = None,
                 device: Optional[Union[str, torch.device]] = None, names: Optional[dict] = None):
        device = torch.device(device) if device is not None else None
        if isinstance(adapter_ids, (list, tuple)):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in adapter_ids):
                raise TypeError(f"adapter_ids: a list must hold ints (adapter slots), got {list(adapter_ids)!r}")
            adapter_ids = torch.tensor(adapter_ids, dtype=torch.int64, device=device)
        if not isinstance(adapter_ids, torch.Tensor):
            raise TypeError(f"adapter_ids must be an integer tensor (batch,) or a list of ints, got "
                            f"{type(adapter_ids).__name__}")
        if adapter_ids.dtype not in _INT_DTYPES:
            raise TypeError(f"adapter_ids must be an integer tensor (int64 or int32), got dtype {adapter_ids.dtype}")
        if adapter_ids.dim() not in (1, 2):
            raise ValueError(f"adapter_ids must be (batch,), one slot per sequence, or (batch, seq), one per token; "
                             f"got shape {tuple(adapter_ids.shape)}")
        if device is not None and not same_device(adapter_ids.device, device):
            raise ValueError(f"adapter_ids is on {adapter_ids.device} but the model runs on {device}; "
                             f"pass adapter_ids.to({str(device)!r})")
        # Copies, never views of the caller's tensor: ids changed after this check must not reach the kernels.
        host = adapter_ids.detach().to("cpu", torch.int64, copy=True).reshape(-1)  # the one host sync
        if host.numel():
            bad = ((host < -1) | (host >= capacity)).nonzero()
            if bad.numel():
                i = int(bad[0, 0])
                raise ValueError(f"adapter_ids[{_index(adapter_ids, i)}] = {int(host[i])} is out of range: ids are -1 "
                                 f"(base model) or a slot 0..{capacity - 1} (the bank's capacity is {capacity})")
            if occupied is not None:
                empty = ((host >= 0) & ~torch.tensor(list(occupied), dtype=torch.bool)[host.clamp(min=0)]).nonzero()
                if empty.numel():
                    i = int(empty[0, 0])
                    loaded = {s: (names or {}).get(s, s) for s, o in enumerate(occupied) if o}
                    raise ValueError(f"adapter_ids[{_index(adapter_ids, i)}] = {int(host[i])} names an empty slot "
                                     f"(never loaded, or removed); loaded slots: {loaded}")
        self.shape = tuple(adapter_ids.shape)
        self.per_token = adapter_ids.dim() == 2
        self.device = adapter_ids.device
        self.capacity = capacity
        self.host = host
        self.ids = adapter_ids.detach().reshape(-1).to(torch.int32, copy=True)  # what the kernels read
        self._plans: dict = {}
        self._rows: dict = {}
        self._collapsed: dict = {}
        #: the :class:`CallFrame` of each model call in progress, innermost last, None where the call
        #: does not say (pushed and popped by the bank's hooks on the model)
        self.frames: list = []

    def __len__(self) -> int:
        return self.host.numel()

    def fit(self, x: torch.Tensor) -> tuple["AdapterRows", int]:
        """(the ids x's rows follow, rows of x (..., K), leading dims flattened, each id covers as
        consecutive rows); raises (naming ``adapter_ids``) when x's leading dims do not fit the ids.

        Per token, (batch, seq) ids, and the innermost model call in progress (:attr:`frames`,
        recorded by the bank):
        - x's leading shape is the ids' shape: 1 row each;
        - x is (batch * seq, K) and the call is batch sequences of seq tokens (OPT flattens them): 1 row each;
        - x is (batch, K), one row per sequence (a pooled layer: BERT's pooler reads each sequence's
          first token): one id per sequence, where each sequence's ids are all equal; refused otherwise.
        Per sequence, (n,) ids:
        - x's first dim is n (the batch): id j covers x[j];
        - x is (n * seq, K) and the call is n sequences of seq tokens (OPT flattens its tokens): seq
          rows each;
        - x's first dim is the call's batch n / e, the call is an encoder-decoder's encoder run before
          ``generate`` expands the batch (:attr:`CallFrame.before_expansion`), and every e consecutive
          ids are equal (repeated for the beams, repeat_interleave): ids[::e], one per x[j].
        Ids that are all equal (every sequence uses one adapter) and are the call's (one per sequence
        of its batch, or per token of its (batch, seq)) cover every row of any x: a layer
        whose rows are not the batch's sequences (DeBERTa's relative position embeddings, one set for
        the batch) is then still each sequence's adapter alone (a call of token ids or embeddings: the
        ids are then known to be one per sequence of its batch).
        Nothing else is guessed: ids short of the batch or beyond it, or rows the call does not account
        for, are refused. Activations whose first dim is not the batch but equals it (time-first (seq,
        batch, H) layouts with seq = batch) cannot be told apart here (the bank transposes the layers
        it knows to be time-first)."""
        lead = tuple(x.shape[:-1])
        frame = self.frames[-1] if self.frames else None
        # The ids are the call's (one per sequence, or per token of its (batch, seq); or, for an encoder
        # run before generate expands the batch, one per copy of each sequence): never broadcast.
        n = self.shape[0]
        matches_call = frame is not None and (
            frame.batch == n or (frame.before_expansion and frame.batch and n % frame.batch == 0)) and (
            not self.per_token or frame.seq is None or frame.seq == self.shape[1])
        def uniform() -> bool:  # one adapter for the whole batch of the call (looked at only when needed)
            return matches_call and len(self) > 0 and bool((self.host == self.host[0]).all())

        not_sequences = _NOT_SEQUENCES if matches_call else ""
        if self.per_token:
            flattened = frame is not None and (frame.batch, frame.seq) == self.shape and lead == (len(self),)
            if lead == self.shape or flattened:
                return self, 1
            if lead == self.shape[:1]:
                return self._per_sequence(), 1
            if uniform():
                return self._one_for_all(lead)
            raise ValueError(f"adapter_ids has shape {self.shape} (one slot per token) but the activations "
                             f"have leading shape {lead}{not_sequences}")
        first = lead[0] if lead else None
        rest = math.prod(lead[1:])
        if first == n:
            return self, rest
        if frame is not None and frame.batch == n and frame.seq is not None and len(lead) == 1 \
                and first == n * frame.seq:
            return self, frame.seq
        collapsed = self._one_per_group(first) if frame is not None and frame.before_expansion \
            and frame.batch == first else None
        if collapsed is not None:
            return collapsed, rest
        if uniform():
            return self._one_for_all(lead)
        raise ValueError(f"adapter_ids has {n} entries (one slot per sequence) but the activations have shape "
                         f"{tuple(x.shape)} (first dim {first}); give one id per sequence of the batch (with "
                         "num_beams or num_return_sequences > 1, generate expands the batch: repeat_interleave the "
                         f"ids to match, or call AdapterBank.generate, which does){not_sequences}")

    def _one_for_all(self, lead: tuple) -> tuple["AdapterRows", int]:
        """Ids that are all equal as one id covering every row of activations of leading shape ``lead``."""
        if "all" not in self._collapsed:
            self._collapsed["all"] = self._subset(len(self))
        return self._collapsed["all"], math.prod(lead)

    def _per_sequence(self) -> "AdapterRows":
        """Per-token ids as one id per sequence, for a layer with one row per sequence; raises where a
        sequence's tokens name different adapters."""
        per_sequence = self._one_per_group(self.shape[0]) if len(self) else self._subset(1)  # (0, seq): (0,)
        if per_sequence is None:
            mixed = self.host.reshape(self.shape)
            i = int((mixed != mixed[:, :1]).any(dim=1).nonzero()[0, 0])
            raise ValueError(f"adapter_ids has shape {self.shape} (one slot per token) but this layer's activations "
                             f"have leading shape {self.shape[:1]}: one row per sequence (a pooled layer, such as "
                             f"BERT's pooler, reads one token of each sequence), which takes one adapter per "
                             f"sequence, and sequence {i} has tokens of several ({sorted(set(mixed[i].tolist()))}); "
                             "give every token of a sequence one id")
        return per_sequence

    def _one_per_group(self, groups: int) -> Optional["AdapterRows"]:
        """These ids split into ``groups`` runs of n / groups consecutive ids, one id per run where every
        run's ids are equal; else None (kept per ``groups``)."""
        n = len(self)
        if not groups or groups > n or n % groups:
            return None
        if groups not in self._collapsed:
            runs = self.host.reshape(groups, n // groups)
            same = bool((runs == runs[:, :1]).all())
            self._collapsed[groups] = self._subset(n // groups) if same else None
        return self._collapsed[groups]

    def _subset(self, step: int) -> "AdapterRows":
        """Every ``step``-th id, already validated."""
        sub = object.__new__(AdapterRows)
        sub.shape, sub.per_token, sub.device, sub.capacity = (len(self) // step,), False, self.device, self.capacity
        sub.host = self.host[::step].clone()
        sub.ids = self.ids[::step].contiguous()
        sub.frames, sub._plans, sub._rows, sub._collapsed = [], {}, {}, {}
        return sub

    def row_slots(self, rows_per_id: int) -> torch.Tensor:
        """(M,) int64 slot of every row, on the device (kept per ``rows_per_id``)."""
        t = self._rows.get(rows_per_id)
        if t is None:
            t = self.ids.to(torch.int64).repeat_interleave(rows_per_id)
            self._rows[rows_per_id] = t
        return t

    def plan(self, rows_per_id: int, block_m: Optional[int] = None):
        """The :class:`~.bank_segment_term.SegmentPlan` of these ids (kept per ``rows_per_id``)."""
        from .bank_segment_term import segment_plan

        key = (rows_per_id, block_m)
        p = self._plans.get(key)
        if p is None:
            p = segment_plan(self.host, rows_per_id, self.device, block_m)
            self._plans[key] = p
        return p


def _index(ids: torch.Tensor, flat: int) -> str:
    if ids.dim() == 1:
        return str(flat)
    return ", ".join(str(i) for i in divmod(flat, ids.shape[1]))


def bank_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                adapter_ids: Union[torch.Tensor, AdapterRows], A: torch.Tensor, B: torch.Tensor, U: torch.Tensor,
                V: Optional[torch.Tensor] = None, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each row of x through the frozen layer (W, b) plus its own adapter (see the module docstring).

    Args:
        x: (..., K) activations, fp32/bf16/fp16 (fp64: torch route), any strides.
        weight: (N, K) frozen base weight in x's dtype; bias: (N,) in x's dtype, or None.
        adapter_ids: (batch,) int slot per sequence (x's first dim, see :meth:`AdapterRows.fit`), or
            x.shape[:-1] per token, -1 = base model only; or an :class:`AdapterRows` (validated once,
            reused across calls).
        A: (R, K) shared or (S, R, K) per slot; B: (N, R) shared or (S, N, R) per slot.
        U: (S, R) per slot s * u (zero rows for slots without an adapter); V: (S, N) per slot v or None.
        row_scale: (S, N) per slot row scale c (DoRA's magnitude over its norm; 1 for slots without
            one) or None.

    Returns:
        (..., N) in x's dtype (the autocast dtype under ``torch.autocast``, which casts x, W and b as
        ``F.linear`` does; the factors keep theirs). Inference only: raises when autograd would need
        a gradient.

    Example:
        >>> x = torch.randn(3, 5, 32); W = torch.randn(48, 32)
        >>> A, B = torch.randn(4, 32), torch.randn(48, 4)
        >>> U = torch.randn(2, 4)          # two adapters sharing A and B, each its own u
        >>> out = bank_linear(x, W, None, torch.tensor([1, -1, 0]), A, B, U)
        >>> torch.allclose(out[1], x[1] @ W.T)   # row -1: the base layer alone
        True
    """
    x, weight, bias = autocast_base(x, weight, bias)
    check_bank_inputs(x, weight, bias, A, B, U, V, row_scale)
    rows = adapter_ids if isinstance(adapter_ids, AdapterRows) else AdapterRows(adapter_ids, U.shape[0],
                                                                                device=x.device)
    if rows.capacity != U.shape[0]:
        raise ValueError(f"adapter_ids was validated for {rows.capacity} slots but U has {U.shape[0]}")
    if not same_device(rows.device, x.device):
        raise ValueError(f"adapter_ids is on {rows.device} but x is on {x.device}")
    return bank_linear_unchecked(x, weight, bias, rows, A, B, U, V, row_scale,
                                 resolve_backend(x, weight, bias, U.shape[1], (A, B, U, V, row_scale), op="bank_linear"))


def bank_linear_unchecked(x, weight, bias, rows: AdapterRows, A, B, U, V, row_scale, backend: str) -> torch.Tensor:
    """:func:`bank_linear` without the checks of the bank's tensors (the bank checks them once per
    ``use``) and with the backend resolved: per call, only x against the ids and against K. Under
    ``torch.autocast`` the caller has cast x, weight and bias (:func:`~tiedlora_kernels.ops.autocast_base`)."""
    if torch.is_grad_enabled():
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("A", A), ("B", B), ("U", U), ("V", V),
                        ("row_scale", row_scale)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"bank_linear (many adapters per batch) is inference only, but {name} requires "
                                   "grad; run it under torch.no_grad() or torch.inference_mode(), or train one "
                                   "adapter at a time")
    K, N = weight.shape[1], weight.shape[0]
    if x.shape[-1] != K:
        raise ValueError(f"bank_linear: x must have last dimension K={K}, got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"bank_linear: x dtype {x.dtype} must equal the weight's {weight.dtype}")
    rows, T = rows.fit(x)
    M = len(rows) * T
    x2 = x.reshape(M, K)
    # autocast off: the term is computed in the factors' dtype, the base GEMM in x's (already the
    # autocast dtype), as the single-adapter op computes them
    with torch.no_grad(), reference.autocast_off(x.device.type):
        if backend == "triton":
            # Triton launches on the current CUDA device: make it x's (a model on cuda:1, say)
            with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
                out = _triton_route(x2, weight, bias, rows, T, A, B, U, V, row_scale)
        else:
            out = _torch_route(x2, weight, bias, rows, T, A, B, U, V, row_scale)
    return out.reshape(*x.shape[:-1], N)


def shared_factors(A: torch.Tensor, B: torch.Tensor) -> bool:
    """True when every slot uses the same A and B: the one-launch route."""
    return A.dim() == 2 and B.dim() == 2


def _triton_route(x2, weight, bias, rows, T, A, B, U, V, C):
    lead_bias = bias if C is None else None  # with a row scale the bias comes after the scale
    if shared_factors(A, B):
        from .bank_term import bank_term

        L = bank_term(x2, A, B, U, V, rows.ids, T, lead_bias)
    else:
        from .bank_segment_term import bank_segment_term

        L = bank_segment_term(x2, A, B, U, V, rows.plan(T), lead_bias)
    y = L.addmm_(x2, weight.t())
    return y if C is None else _scale_rows(y, bias, C, rows.row_slots(T))


def _scale_rows(y, bias, C, slots):
    """b + y * C[a] (C[-1] = 1), computed in fp32 and rounded once, as the single-adapter op does."""
    c = torch.where((slots >= 0)[:, None], C[slots.clamp(min=0)], 1.0)
    cs = torch.promote_types(y.dtype, C.dtype)
    out = y.to(cs) * c.to(cs)
    return (out + bias.to(cs) if bias is not None else out).to(y.dtype)


def _torch_route(x2, weight, bias, rows, T, A, B, U, V, C):
    ct = adapter_compute_dtype(x2, A)
    slots = rows.row_slots(T)
    live = (slots >= 0)[:, None]
    a = slots.clamp(min=0)
    if shared_factors(A, B):
        h = x2.to(ct) @ A.to(ct).t()
        z = torch.where(live, h * U[a].to(ct), 0.0)
        d = z @ B.to(ct).t()
        if V is not None:
            d = d * V[a].to(ct)
        d = torch.where(live, d, 0.0)  # base-only rows: 0, not 0 * B (a non-finite B would reach them)
    else:
        d = x2.new_zeros((x2.shape[0], weight.shape[0]), dtype=ct)
        plan = rows.plan(T)
        for i, s in enumerate(plan.slots):
            if s < 0:
                continue
            idx = plan.perm[plan.bounds[i]:plan.bounds[i + 1]].long()
            As = A[s] if A.dim() == 3 else A
            Bs = B[s] if B.dim() == 3 else B
            ds = ((x2[idx].to(ct) @ As.to(ct).t()) * U[s].to(ct)) @ Bs.to(ct).t()
            d[idx] = ds * V[s].to(ct) if V is not None else ds
    out = F.linear(x2, weight, bias if C is None else None) + d.to(x2.dtype)
    return out if C is None else _scale_rows(out, bias, C, slots)


def check_bank_inputs(x, weight, bias, A, B, U, V=None, row_scale=None) -> None:
    """Validate the tensors of :func:`bank_linear` (shapes in its docstring); each error names the argument."""
    op = "bank_linear"
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.dim() < 1:
        raise TypeError(f"{op}: x must be a floating tensor (..., K) (fp16/bf16/fp32/fp64), got {_describe(x)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{op}: weight must be a 2-D tensor (N, K), got {_describe(weight)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x must have last dimension K={K}, got {_describe(x)}")
    if not isinstance(U, torch.Tensor) or U.dim() != 2:
        raise ValueError(f"{op}: U must be (S, R), got {_describe(U)}")
    S, R = U.shape
    if S == 0:
        raise ValueError(f"{op}: U must hold at least one slot, (S >= 1, R), got {_describe(U)}")
    want = {"weight": (N, K), "bias": (N,), "A": [(R, K), (S, R, K)], "B": [(N, R), (S, N, R)], "U": (S, R),
            "V": (S, N), "row_scale": (S, N)}
    for name, t in (("weight", weight), ("bias", bias), ("A", A), ("B", B), ("U", U), ("V", V),
                    ("row_scale", row_scale)):
        if t is None:
            if name in ("A", "B"):
                raise ValueError(f"{op}: {name} is required")
            continue
        shapes = want[name] if isinstance(want[name], list) else [want[name]]
        if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a floating tensor (fp16/bf16/fp32/fp64), got {_describe(t)}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{op}: {name} must have shape {' or '.join(str(s) for s in shapes)}, got {_describe(t)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on {x.device} (the device of x), got {_describe(t)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} dtype {t.dtype} must equal x dtype {x.dtype}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"
    return type(t).__name__


__all__ = ["AdapterRows", "CallFrame", "bank_linear", "bank_linear_unchecked", "check_bank_inputs", "same_device",
           "shared_factors"]
