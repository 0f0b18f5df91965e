"""Serve many adapters of one base model in one batch: every sequence runs with its own adapter.

An :class:`AdapterBank` belongs to one model prepared by :func:`tiedlora_kernels.inject` and keeps,
for each adapted layer, the effective tensors of many adapters stacked in *slots* (the adapter id a
request names). Inside ``bank.use(adapter_ids)`` every adapted layer computes, for each row, its base
output plus the term of that row's adapter, in one call per layer (``ops/bank_linear.py``)::

    bank = AdapterBank(model, capacity=16)          # model: injected (its own adapter is not used here)
    math = bank.add("adapters/math")                 # a save_adapter directory -> slot 0
    upper = bank.add(other_model, name="upper")       # a live injected model    -> slot 1
    ids = torch.tensor([math, upper, -1, math])      # one slot per sequence; -1 = base model alone
    with torch.no_grad(), bank.use(ids):
        logits = model(input_ids).logits             # (4, T, V): row i with adapter ids[i]
        tokens = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    bank.remove("upper")                              # slot 1 is free again; the others untouched

What one slot holds, per layer (docs/MATH.md's effective tensors of the layer, whatever the preset):
A_i (r, K), B_i (N, r), s_i * u_i (r,), v_i (N,), and DoRA's row scale c_i (N,). The bank stores
s * u in U (S, R) and v in V (S, N) (S slots, R the bank's rank), and each of A and B **once** for a
layer where every loaded adapter has the same one: VeRA adapters of one seed and rank (both factors
seeded and frozen), TL1/TL2 adapters of one seed (their frozen B), TL3/TL4 (their frozen A), and
adapters that reuse one trained tied pair and differ only in u and v (a TL2/TL4/TL6 pair trained
once, then per-user vectors). A layer whose A and B are both shared runs the shared route: one
launch, the cost of one adapter. Otherwise the factor that differs is stored per slot, (S, R, K) or
(S, N, R), and the layer runs the segmented route (rows grouped by adapter, SGMV-style; a shared
factor is still stored and read once). Each layer chooses by itself, on every add and remove.

DoRA's and Simple DoRA's row scales (c = m / ||W + s B A||, m / ||W||) and Simple DoRA's v_i = v ||W||
depend on the base weight W: the bank keeps their magnitude m (and Simple DoRA's v) and derives them
from W as it is when ``use`` starts (for the slots the request names), so a row follows base weights
loaded or changed after the add, as its adapter alone does at each call (W must not change inside a
context).

What can be mixed in one bank: adapters of every preset (lora, vera, tl1-tl6, partial, tl_extra,
tensor_embed, dora, simple_dora) and any alpha, of rank at most the bank's (lower ranks are
zero-padded), adapting any subset of the model's adapted layers (a layer an adapter leaves out adds
nothing for its rows), all trained on this base model. Not supported: quantized base layers, merged
models, and training (inference only: the bank's forward refuses inputs that require grad).

Which rows belong to which sequence: a layer's rows are its input's leading dims, the first being
the batch (see :meth:`AdapterRows.fit <tiedlora_kernels.ops.bank_linear.AdapterRows.fit>`: OPT's
(batch * seq, H) activations and an encoder-decoder's encoder under beams are recognised too).
Refused when the bank is made: adapted layers inside a mixture-of-experts block (a module path with
a part named ``experts`` or ``expert_<n>``: an expert sees the tokens routed to it, gathered from
every sequence) or a multimodal model's image or audio encoder or projector (``vision_tower``,
``visual``, ``multi_modal_projector``, ``audio_tower``...: its rows are images' patches or audio
clips' frames, any number per prompt). Layers known to see the batch on another axis than the first
(:data:`_TIME_FIRST`: Longformer's and LED's self-attention, FSMT's layers, XLNet's feed-forward,
Mask2Former's and OneFormer's decoder feed-forward, DAB-DETR's box head, BROS's heads and bbox
projection) are served with that axis moved first. A batch whose sequences all use one adapter is
served by any layer, whatever its rows are. Not supported, and not detectable: other models whose
adapted layers see time-first activations: where seq equals the batch, rows would silently get
other sequences' adapters.

Memory: per layer and slot, R + N fp32 values (U, V; V only once an adapter has a v), N more with a
row scale, N (DoRA) or 2N (Simple DoRA) more for a magnitude's m and v, plus R (K + N) factor values
for a per-slot factor (``factor_dtype``, fp32 by default). Slots are allocated up front (``capacity``)
and grown by doubling when full; adding or removing an adapter writes its slot only, and a request
(``use``) allocates nothing in the bank.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import re
import sys
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Optional, Union

import torch
import torch.nn as nn

from . import reference
from .integrations import adapted_layers, adapter_config, load_adapter
from .integrations.checkpoint import unwrapped
from .integrations.shell import linear_shell
from .modules import TiedLoRALinear
from .ops import autocast_base, resolve_backend
from .ops.bank_linear import AdapterRows, CallFrame, bank_linear_unchecked, same_device, shared_factors
from .validation import FLOAT_DTYPES, _check_tensor, check_adapter_tensors, check_scaling

#: Routes a layer can take (:meth:`AdapterBank.routes`).
ROUTES = ("base", "shared", "segmented")

#: dtypes the bank can store A and B in (``factor_dtype``): those the bank's kernels and the torch route
#: compute with (float8 has neither the arithmetic nor the finiteness checks an add runs).
FACTOR_DTYPES = FLOAT_DTYPES

#: Blocks whose layers' rows cannot be matched to the batch's sequences, by a part of the module path
#: naming them, with why: mixture-of-experts experts (SwitchTransformers' and NLLB-MoE's
#: ``experts.expert_0``, Mixtral's, Qwen-MoE's and DeepSeek's ``experts.0``; not a shared expert that
#: every token passes through, ``shared_expert(s)``), and a multimodal model's image and audio
#: encoders and projectors (LLaVA's and Gemma 3's ``vision_tower`` and ``multi_modal_projector``,
#: BLIP-2's and Idefics' ``vision_model``, Idefics2's ``connector``, Qwen2-VL's ``visual``,
#: Qwen2-Audio's and Voxtral's ``audio_tower``, Fuyu's ``vision_embed_tokens``).
_UNSERVABLE_BLOCKS = (
    (re.compile(r"experts|expert_?\d+"), "a mixture-of-experts block",
     "an expert sees the tokens routed to it, gathered from every sequence"),
    (re.compile(r"vision_tower|vision_model|vision_encoder|image_encoder|visual|vision_embed_tokens|"
                r"audio_tower|audio_model|audio_encoder|speech_encoder|multi_modal_projector|mm_projector|"
                r"connector|perceiver_resampler"), "an image or audio encoder or projector",
     "its rows are images' patches or audio clips' frames, as many per prompt as it has images or clips"),
)


#: Layers that see time-first activations (the batch not first), by an ancestor's transformers package
#: and class: (its children concerned, None for every adapted layer below it; the batch's axis). Longformer's and
#: LED's encoder self-attention transpose the batch behind the sequence before query/key/value (and the
#: ``_global`` ones); FSMT keeps fairseq's T x B x C layout through its encoder and decoder layers;
#: XLNet runs (qlen, batch, d) through its feed-forward; Mask2Former's and OneFormer's decoder layers
#: run (queries, batch, d) through their feed-forward; DAB-DETR's box head runs on every decoder
#: layer's output stacked, (layers, batch, queries, d); BROS's SPADE heads run on transposed hidden
#: states and its bbox projection on (seq, seq, batch, d) pairs. The bank serves them with the
#: batch's axis moved first: taken as batch-first, their rows went to other sequences' adapters.
_TIME_FIRST = {
    ("longformer", "LongformerSelfAttention"): (None, 1),
    ("led", "LEDEncoderSelfAttention"): (None, 1),
    ("fsmt", "Attention"): (None, 1),
    ("fsmt", "EncoderLayer"): (None, 1),
    ("fsmt", "DecoderLayer"): (None, 1),
    ("xlnet", "XLNetFeedForward"): (None, 1),
    ("mask2former", "Mask2FormerMaskedAttentionDecoderLayer"): (("fc1", "fc2"), 1),
    ("oneformer", "OneFormerTransformerDecoderFFNLayer"): (None, 1),
    ("oneformer", "OneFormerTransformerDecoderQueryTransformerDecoderLayer"): (None, 1),
    ("dab_detr", "DabDetrForObjectDetection"): (("bbox_predictor",), 1),
    ("bros", "BrosRelationExtractor"): (None, 1),
    ("bros", "BrosSpadeEEForTokenClassification"): (("initial_token_classifier",), 1),
    ("bros", "BrosBboxEmbeddings"): (("bbox_projection",), 2),
}


def _batch_axis(model: nn.Module, name: str) -> int:
    """The axis of adapted layer ``name``'s input that is the batch (:data:`_TIME_FIRST`; 0 for the rest):
    the nearest ancestor in the table decides, by the child of it the layer sits under (a layer inside
    a Sequential or an MLP is named by that child: BROS's ``initial_token_classifier``, DAB-DETR's
    ``bbox_predictor``)."""
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):
        owner = model.get_submodule(".".join(parts[:-depth]))
        package = type(owner).__module__.split(".")
        rule = _TIME_FIRST.get((package[-2] if len(package) >= 2 else "", type(owner).__name__))
        if rule is not None:
            children, axis = rule
            return axis if children is None or parts[-depth] in children else 0
    return 0


def _normal_tensors(method):
    """Run a bank method outside ``torch.inference_mode`` (and without grad): the bank's tensors are
    written in place by later adds and removes, which an inference tensor (one allocated under
    inference_mode) refuses outside that mode, half-way through the layers."""
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return method(*args, **kwargs)
    return wrapped


class LayerAdapter(NamedTuple):
    """One adapter's effective tensors for one layer (what :meth:`TiedLoRALinear.op_tensors` gives):
    A (r, K), B (N, r), u (r,) or None, v (N,) or None, row_scale c (N,) or None, and its scaling s.

    Or, for a DoRA or Simple DoRA layer whose row scale the bank derives from the base weight as it is
    when each :meth:`AdapterBank.use` starts (as the layer does at each call): ``magnitude`` "dora" or
    "simple_dora" (:class:`TiedLoRALinear`'s), its trained magnitude ``m`` (N,), row_scale None, and v
    the layer's trained v (Simple DoRA: before its product with ||W||)."""

    A: torch.Tensor
    B: torch.Tensor
    u: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    row_scale: Optional[torch.Tensor]
    scaling: float
    magnitude: str = "none"
    m: Optional[torch.Tensor] = None


#: ``LayerAdapter.magnitude`` values: a fixed row scale (or none), or one derived from the base weight.
MAGNITUDES = ("none", "dora", "simple_dora")


class _Magnitude(NamedTuple):
    """What a DoRA or Simple DoRA slot keeps to derive its row scale (and Simple DoRA's v_i) from the
    base weight: ``kind`` ("dora", "simple_dora"), m (N,), and Simple DoRA's trained v (N,) (ones
    where it has none), in the adapter's dtypes, as the layer computes them."""

    kind: str
    m: torch.Tensor
    v: Optional[torch.Tensor]


class _Slots:
    """The slots of one layer. A, B: None (no adapter adapts the layer), shared (R, K) / (N, R), or per
    slot (S, R, K) / (S, N, R). U (S, R) fp32 s * u (0 for slots without this layer); V, C (S, N)
    fp32 or None (all 1). ``present[s]``: slot s adapts this layer. ``magnitudes[s]``: what slot s
    derives its C row (and Simple DoRA's V row) from, recomputed by :meth:`refresh`.

    An add does not compare slots to one another: ``ref[k]`` is the layer's reference A or B (the
    shared one, or the one the first adapters had before another made the factor per slot) and
    ``fid[k][s]`` is 0 where slot s holds exactly ``ref[k]`` (an add compares the new factor with it,
    one comparison per layer and factor), else an id of its own. A remove makes a per-slot factor
    shared again when the remaining slots hold one factor: one id, or several whose factors are equal
    (equal factors added after a differing one; compared then, two slots first)."""

    def __init__(self, K: int, N: int, R: int, capacity: int, device, factor_dtype):
        self.K, self.N, self.R = K, N, R
        self.device, self.factor_dtype = device, factor_dtype
        self.A: Optional[torch.Tensor] = None
        self.B: Optional[torch.Tensor] = None
        self.U = torch.zeros((capacity, R), device=device, dtype=torch.float32)
        self.V: Optional[torch.Tensor] = None
        self.C: Optional[torch.Tensor] = None
        self.present = [False] * capacity
        self.magnitudes: dict[int, _Magnitude] = {}
        self.ref: dict = {"A": None, "B": None}
        self.fid: dict = {"A": [0] * capacity, "B": [0] * capacity}
        self._next_id = 1

    @property
    def route(self) -> str:
        if self.A is None:
            return "base"
        return "shared" if shared_factors(self.A, self.B) else "segmented"

    def tensors(self) -> dict:
        return dict(A=self.A, B=self.B, U=self.U, V=self.V, C=self.C)

    def nbytes(self) -> int:
        kept = [t for mag in self.magnitudes.values() for t in (mag.m, mag.v)]
        seen = {id(t): t for t in [*self.tensors().values(), *self.ref.values(), *kept] if t is not None}
        return sum(t.numel() * t.element_size() for t in seen.values())

    # Adding is staged: ``stage`` allocates whatever the slot needs (growth, a shared factor turned
    # per slot, V or C on first use) without touching the layer; ``commit`` installs it and writes
    # the slot. A failure before the commit leaves the bank as it was.
    def stage(self, slot: int, entry: Optional[tuple], capacity: int, same: Optional[dict] = None) -> dict:
        """The layer's state after adding ``entry`` in ``slot`` (tensors unchanged are the current
        objects). ``same``: for each factor ("A", "B"), whether the entry's equals ``ref``
        (:meth:`AdapterBank._matches`)."""
        grow = capacity - len(self.present)
        t = {k: (_resized(v, capacity, 1.0 if k in ("V", "C") else 0.0) if (grow and v is not None and
                 (k in ("U", "V", "C") or v.dim() == 3)) else v) for k, v in self.tensors().items()}
        t["ref"] = dict(self.ref)
        t["fid"] = {k: ids + [0] * grow for k, ids in self.fid.items()}
        t["next_id"] = self._next_id
        if entry is None:
            return t
        A, B, _, v, c, mag = entry
        for k, new in (("A", A), ("B", B)):
            if t["ref"][k] is None:  # the first adapter of this layer: its factor is the shared one
                t["ref"][k] = t[k] = new
                t["fid"][k][slot] = 0
            elif (same or {}).get(k, False):
                t["fid"][k][slot] = 0
            else:
                if t[k].dim() == 2:  # now per slot: every slot so far holds ref
                    t[k] = t[k].unsqueeze(0).repeat(capacity, *([1] * t[k].dim()))
                t["fid"][k][slot] = t["next_id"]
                t["next_id"] += 1
        derived = {"V": mag is not None and mag.kind == "simple_dora", "C": mag is not None}
        for k, given in (("V", v), ("C", c)):
            if (given is not None or derived[k]) and t[k] is None:
                t[k] = torch.ones((capacity, self.N), device=self.device, dtype=torch.float32)
        return t

    def commit(self, staged: dict, slot: int, entry: Optional[tuple], capacity: int) -> None:
        self.A, self.B, self.U, self.V, self.C = (staged[k] for k in ("A", "B", "U", "V", "C"))
        self.ref, self.fid, self._next_id = staged["ref"], staged["fid"], staged["next_id"]
        self.present = self.present + [False] * (capacity - len(self.present))
        if entry is None:
            return
        A, B, U_row, v, c, mag = entry
        with torch.no_grad():
            if self.A.dim() == 3:
                self.A[slot].copy_(A)
            if self.B.dim() == 3:
                self.B[slot].copy_(B)
            self.U[slot].copy_(U_row)
            if self.V is not None:
                self.V[slot].copy_(v) if v is not None else self.V[slot].fill_(1.0)
            if self.C is not None:
                self.C[slot].copy_(c) if c is not None else self.C[slot].fill_(1.0)
        if mag is not None:  # its C (and V) rows are written by refresh, when a request names the slot
            self.magnitudes[slot] = mag
        self.present[slot] = True

    def _all_equal(self, k: str, live: list[int]) -> bool:
        """Whether the live slots hold one factor ``k`` under several ids: two slots of different ids
        are compared first (one small host sync), all of them only when those two agree."""
        t, fid, first = getattr(self, k), self.fid[k], live[0]
        other = next(s for s in live if fid[s] != fid[first])
        return torch.equal(t[first], t[other]) and bool((t[live] == t[first]).all())

    def clear(self, slot: int) -> None:
        """Empty ``slot``; where the remaining adapters agree again, a per-slot factor becomes shared."""
        if not self.present[slot]:
            return
        self.present[slot] = False
        self.magnitudes.pop(slot, None)
        with torch.no_grad():
            self.U[slot].zero_()
            for t in (self.V, self.C):
                if t is not None:
                    t[slot].fill_(1.0)
        live = [s for s, p in enumerate(self.present) if p]
        if not live:
            self.A = self.B = self.V = self.C = None
            self.ref = {"A": None, "B": None}
            return
        for k in ("A", "B"):
            t = getattr(self, k)
            self.fid[k][slot] = 0
            if t.dim() != 3:
                continue
            t[slot].zero_()
            ids = {self.fid[k][s] for s in live}
            if ids == {0}:
                setattr(self, k, self.ref[k])
            elif len(ids) == 1 or self._all_equal(k, live):  # the remaining slots share another factor:
                # it becomes the reference (equal factors added after a differing one got ids of their own)
                self.ref[k] = t[live[0]].clone()
                setattr(self, k, self.ref[k])
                for s in live:
                    self.fid[k][s] = 0

    def refresh(self, slots: list[int], weight: torch.Tensor) -> None:
        """Write the C rows (and Simple DoRA's V rows) of ``slots`` (slots with a magnitude) from the base
        weight (N, K) as it is now, as :meth:`TiedLoRALinear.op_tensors` computes them at each call:
        Simple DoRA v_i = v ||W||, c = m / ||W||; DoRA c = m / ||W + diag(V) B diag(U) A|| (U = s u, the
        slot's stored factors)."""
        with torch.no_grad(), reference.autocast_off(weight.device.type):
            base_norm = None  # ||W||, one for every Simple DoRA slot
            for slot in slots:
                mag = self.magnitudes[slot]
                if mag.kind == "simple_dora":
                    if base_norm is None:
                        base_norm = reference.direction_norm(reference.row_norm(weight))
                    # in fp32 at least, as the layer forms it (in a bf16 file's dtype ||W|| and the
                    # product were each rounded to bf16)
                    self.V[slot].copy_(reference.at_least_fp32(mag.v) * base_norm)
                    norm = base_norm
                else:
                    A = self.A[slot] if self.A.dim() == 3 else self.A
                    B = self.B[slot] if self.B.dim() == 3 else self.B
                    norm = reference.merged_row_norm(weight, A, B, self.U[slot],
                                                     self.V[slot] if self.V is not None else None, 1.0)
                self.C[slot].copy_(reference.dora_row_scale(mag.m, norm))


def _slot_id(adapter, where: str) -> int:
    """``adapter`` as a slot id: any integer (an int, a numpy integer, a one-element integer tensor),
    not a bool (True would name slot 1)."""
    if isinstance(adapter, bool) or (isinstance(adapter, torch.Tensor) and adapter.dtype == torch.bool):
        raise TypeError(f"{where}: adapter must be an adapter id (an integer) or a name, got the bool {adapter!r}")
    try:
        return operator.index(adapter)
    except TypeError:
        raise TypeError(f"{where}: adapter must be an adapter id (an integer) or a name, got {adapter!r}") from None


def _check_capacity(where: str, capacity) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"{where}: capacity must be an int >= 1, got {capacity!r}")


def _resized(t: torch.Tensor, capacity: int, fill: float) -> torch.Tensor:
    """A new (capacity, ...) tensor holding t's rows, the new rows set to ``fill``."""
    out = torch.full((capacity, *t.shape[1:]), fill, device=t.device, dtype=t.dtype)
    out[:t.shape[0]].copy_(t)
    return out


def _call_frame(args: tuple, kwargs: dict) -> Optional[CallFrame]:
    """(batch, seq) of a transformers model call, from its token ids or embeddings; (batch, None) from
    a call of images or audio alone (``pixel_values``, ``input_features``, ``input_values``, or a
    floating first argument: one per example there; a multimodal model's call gives token ids, which
    decide, and its image or audio encoder, which sees its own count of images, is not served); else None."""
    for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
        t = kwargs.get(key)
        if t is not None:
            return CallFrame(*t.shape[:2]) if t.dim() >= 2 else None
    first = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2 else None
    if first is not None and not first.is_floating_point():  # positional token ids
        return CallFrame(*first.shape[:2])
    for key in ("pixel_values", "input_features", "input_values"):
        t = kwargs.get(key)
        if t is not None and t.dim() >= 2:
            return CallFrame(t.shape[0], None)
    # positional images or audio (an inner model's call)
    return CallFrame(first.shape[0], None) if first is not None else None


def _generate_copies(model: nn.Module, kwargs: dict) -> int:
    """How many consecutive copies of each prompt ``model.generate(**kwargs)`` makes: max(num_beams,
    num_return_sequences), each read as generate reads it (kwargs, then a passed generation_config's
    set fields, then the model's)."""
    configs = [kwargs, vars(kwargs["generation_config"]) if kwargs.get("generation_config") is not None else {},
               getattr(getattr(model, "generation_config", None), "__dict__", {})]

    def setting(key: str) -> int:
        return int(next((c[key] for c in configs if c.get(key) is not None), 1))

    return max(setting("num_beams"), setting("num_return_sequences"))


def _model_calls(model: nn.Module) -> list[nn.Module]:
    """The root and every transformers model inside it: the calls whose shape the bank records."""
    transformers = sys.modules.get("transformers")
    inner = [m for m in model.modules() if transformers is not None and isinstance(m, transformers.PreTrainedModel)]
    return [model, *[m for m in inner if m is not model]]


def _encoders(calls: list[nn.Module]) -> list[nn.Module]:
    """The encoders of the encoder-decoder models among ``calls``: ``generate`` calls them on their own,
    on the prompts, before it expands the batch for beams or returned sequences."""
    found: list[nn.Module] = []
    for m in calls:
        if getattr(getattr(m, "config", None), "is_encoder_decoder", False) and hasattr(m, "get_encoder"):
            encoder = m.get_encoder()
            if all(encoder is not e for e in found):  # once: a model and its inner model name the same one
                found.append(encoder)
    return found


class _Route:
    """``TiedLoRALinear.bank_route`` while a bank is in use: the layer's output, each row with its slot."""

    def __init__(self, bank: "AdapterBank", name: str, batch_axis: int = 0):
        self.bank, self.name, self.batch_axis = bank, name, batch_axis

    def __call__(self, layer: TiedLoRALinear, x: torch.Tensor) -> torch.Tensor:
        a = self.batch_axis
        try:
            if a and x.dim() > a + 1:  # (seq, batch, ...): each sequence's rows batch-first
                return self._forward(layer, x.movedim(a, 0)).movedim(0, a).contiguous()
            return self._forward(layer, x)
        except ValueError as e:  # which layer: a pooled layer, a flattened one, an encoder's
            raise ValueError(f"AdapterBank: layer {self.name!r}: {e}") from None

    def _forward(self, layer: TiedLoRALinear, x: torch.Tensor) -> torch.Tensor:
        rows = self.bank._active
        slots = self.bank._layers[self.name]
        x, weight, bias = autocast_base(x, layer.weight_nk(), layer.bias)
        if slots.A is None:  # no loaded adapter adapts this layer
            rows.fit(x)
            return nn.functional.linear(x, weight, bias)
        return bank_linear_unchecked(x, weight, bias, rows, slots.A, slots.B, slots.U, slots.V, slots.C,
                                     # (B has A's dtype, U, V, C are fp32: A alone decides what they could)
                                     resolve_backend(x, weight, bias, slots.R, (slots.A,), op="bank_linear"))


class AdapterBank:
    """Many adapters of one injected model, stacked per layer in slots, served per row in one batch.

    Args:
        model: a model prepared by :func:`tiedlora_kernels.inject` (any preset: it fixes which layers
            can be adapted; its own adapter is not used inside :meth:`use`). All its adapted layers on
            one device, none merged, none over a quantized base, none inside a block whose rows are
            not the batch's sequences (a mixture-of-experts block, an image or audio encoder or
            projector: see the module docstring; time-first models are not supported either).
        capacity: slots allocated up front (>= 1); :meth:`add` doubles it when full.
        rank: the bank's rank R (default: the model's adapter rank); adapters of lower rank are
            zero-padded to it, higher ranks are refused.
        factor_dtype: dtype of the stored A and B (default fp32, as adapters train; bf16 halves the
            memory and the bytes of per-slot factors). U, V and row scales are always fp32.

    Example:
        >>> bank = AdapterBank(model, capacity=4)
        >>> a, b = bank.add("out/math"), bank.add("out/upper")
        >>> out = bank.generate(input_ids, adapter_ids=[a, b], attention_mask=mask, max_new_tokens=16)
    """

    @_normal_tensors
    def __init__(self, model: nn.Module, capacity: int = 8, *, rank: Optional[int] = None,
                 factor_dtype: torch.dtype = torch.float32):
        if unwrapped(model) is not model:  # names read through a wrapper fit no adapter file
            raise ValueError(f"AdapterBank: the model is wrapped ({type(model).__name__}); pass the plain model inside "
                             "(torch.compile of the bank's forward is not supported: its routing is host-side)")
        config = adapter_config(model)  # raises when the model has no adapters
        _check_capacity("AdapterBank", capacity)
        rank = config.rank if rank is None else rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"AdapterBank: rank must be an int >= 1, got {rank!r}")
        if factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"AdapterBank: factor_dtype must be one of {', '.join(map(str, FACTOR_DTYPES))}, "
                             f"got {factor_dtype!r}")
        layers = list(adapted_layers(model))
        for name, layer in layers:
            if layer.layout == "quantized":
                raise ValueError(f"AdapterBank: layer {name!r} has a quantized base ({layer.base_kind.name}); "
                                 "the bank serves dense nn.Linear / Conv1D bases only")
            if layer.merged:
                raise ValueError(f"AdapterBank: layer {name!r} is merged; unmerge(model) first (a merged weight "
                                 "carries one adapter into every row)")
            for pattern, block, why in _UNSERVABLE_BLOCKS:
                part = next((p for p in name.split(".") if pattern.fullmatch(p)), None)
                if part is not None:
                    raise ValueError(f"AdapterBank: layer {name!r} sits inside {block} ({part!r}): {why}, "
                                     "which cannot be matched to the batch's sequences; inject the model without its layers "
                                     f"(exclude_modules=[{part!r}]) to serve it")
        devices = {layer.weight.device for _, layer in layers}
        if len(devices) != 1:
            raise ValueError(f"AdapterBank: the adapted layers are on several devices {sorted(map(str, devices))}; "
                             "the bank serves a model on one device")
        self.model = model
        self.rank = rank
        self.factor_dtype = factor_dtype
        self.device = devices.pop()
        self._capacity = capacity
        self._names: list[Optional[str]] = [None] * capacity
        self._layers = {name: _Slots(layer.in_features, layer.out_features, rank, capacity, self.device, factor_dtype)
                        for name, layer in layers}
        self._modules = dict(layers)
        self._calls = _model_calls(model)  # the calls whose shape use() records (the module tree is fixed)
        self._encoders = _encoders(self._calls)
        self._calls += [e for e in self._encoders if e not in self._calls]
        self._routes = {name: _Route(self, name, _batch_axis(model, name)) for name in self._layers}
        self._active: Optional[AdapterRows] = None

    @property
    def capacity(self) -> int:
        """Slots allocated (loaded or free)."""
        return self._capacity

    def __len__(self) -> int:
        return sum(n is not None for n in self._names)

    def __contains__(self, name: str) -> bool:
        return isinstance(name, str) and name in self._names

    @property
    def adapters(self) -> dict[int, str]:
        """Loaded adapters: slot -> name."""
        return {s: n for s, n in enumerate(self._names) if n is not None}

    def slot(self, name: str) -> int:
        """The slot (adapter id) of the adapter called ``name``."""
        if not isinstance(name, str):  # None would find a free slot
            raise TypeError(f"AdapterBank.slot: name must be a string, got {type(name).__name__}")
        try:
            return self._names.index(name)
        except ValueError:
            raise KeyError(f"AdapterBank: no adapter named {name!r}; loaded: {self.adapters}") from None

    def routes(self) -> dict[str, str]:
        """Layer name -> ``"base"`` (no loaded adapter adapts it), ``"shared"`` (one A and B for every
        slot: one launch, rows gather their u and v) or ``"segmented"`` (per-slot A and/or B)."""
        return {name: s.route for name, s in self._layers.items()}

    def nbytes(self) -> int:
        """Bytes the bank's tensors take on its device."""
        return sum(s.nbytes() for s in self._layers.values())

    def __repr__(self) -> str:
        counts = {r: sum(v == r for v in self.routes().values()) for r in ROUTES}
        return (f"AdapterBank({len(self)}/{self.capacity} slots, rank={self.rank}, layers={len(self._layers)} "
                f"(routes {counts}), {self.nbytes() / 2**20:.1f} MiB on {self.device})")

    @_normal_tensors
    def add(self, source: Union[str, Path, nn.Module, Mapping[str, LayerAdapter]], name: Optional[str] = None) -> int:
        """Load an adapter into a free slot and return the slot (its adapter id).

        Args:
            source: a :func:`~tiedlora_kernels.save_adapter` directory; or a model injected with the
                adapter (a copy of this base model, trained: its layers' effective tensors are read);
                or a mapping layer name -> :class:`LayerAdapter` (the layers it leaves out add nothing).
            name: the adapter's name (default: the directory's name, else ``adapter<slot>``); unique.

        Everything is read and checked before the bank changes: a file that does not fit (another
        model's layers, a rank above the bank's, a corrupt file) raises ``ValueError`` and leaves the
        bank as it was. A full bank doubles its capacity. Under ``torch.inference_mode`` or not, the
        bank's tensors are normal tensors, which later adds and removes can write in either mode.
        """
        self._refuse_in_use("add")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"AdapterBank.add: name must be a non-empty string, got {name!r}")
        if isinstance(source, (str, Path)):
            effective = self._read_directory(Path(source))
            name = name or Path(source).resolve().name
        elif isinstance(source, nn.Module):
            effective = _effective_tensors(source)
        elif isinstance(source, Mapping):
            effective = dict(source)
        else:
            raise TypeError(f"AdapterBank.add: source must be an adapter directory, an injected model or a mapping "
                            f"of layer name -> LayerAdapter, got {type(source).__name__}")
        slot = next((s for s, n in enumerate(self._names) if n is None), self._capacity)
        if name is None:  # adapter<slot>, made unique if an explicitly named adapter already has it
            name, i = f"adapter{slot}", 0
            while name in self._names:
                i += 1
                name = f"adapter{slot}_{i}"
        if name in self._names:
            raise ValueError(f"AdapterBank.add: an adapter named {name!r} is already loaded (slot "
                             f"{self._names.index(name)}); remove it first or choose another name")
        entries = self._prepare(effective)
        same = self._matches(entries)
        capacity = self._capacity if slot < self._capacity else 2 * self._capacity
        staged = {ln: s.stage(slot, entries.get(ln), capacity, same.get(ln)) for ln, s in self._layers.items()}
        # Nothing above changed the bank; from here on nothing can fail but the device itself.
        for ln, s in self._layers.items():
            s.commit(staged[ln], slot, entries.get(ln), capacity)
        self._names += [None] * (capacity - self._capacity)
        self._capacity = capacity
        self._names[slot] = name
        return slot

    @_normal_tensors
    def remove(self, adapter: Union[int, str]) -> None:
        """Free the slot of ``adapter`` (its id, any integer, or its name). Other slots and their ids do not change."""
        self._refuse_in_use("remove")
        slot = self.slot(adapter) if isinstance(adapter, str) else _slot_id(adapter, "AdapterBank.remove")
        if not (0 <= slot < self._capacity) or self._names[slot] is None:
            raise KeyError(f"AdapterBank.remove: no adapter in slot {slot}; loaded: {self.adapters}")
        for s in self._layers.values():
            s.clear(slot)
        self._names[slot] = None

    @_normal_tensors
    def reserve(self, capacity: int) -> None:
        """Grow to at least ``capacity`` slots now (one allocation per tensor), not on a later add."""
        self._refuse_in_use("reserve")
        _check_capacity("AdapterBank.reserve", capacity)
        if capacity <= self._capacity:
            return
        staged = {ln: s.stage(0, None, capacity) for ln, s in self._layers.items()}
        for ln, s in self._layers.items():
            s.commit(staged[ln], 0, None, capacity)
        self._names += [None] * (capacity - self._capacity)
        self._capacity = capacity

    @contextlib.contextmanager
    def use(self, adapter_ids) -> Iterator[AdapterRows]:
        """Within the context, every forward of the model runs each row with its own adapter.

        Args:
            adapter_ids: (batch,) slot per sequence (broadcast over its tokens), or (batch, seq) slot
                per token; an integer tensor on the model's device or a list of ints. -1 = the base
                model alone. Checked once here (one host sync): dtype, rank, device, range, loaded
                slots; each layer then checks only that the batch matches (ids that do not match it
                are refused, never broadcast). Per token: a layer with one row per sequence (a pooled
                layer, such as BERT's pooler, which reads one token of each sequence) takes one id per
                sequence, so each sequence's ids must then be all equal, else that layer refuses them.

        Works for ``model(input_ids)`` and ``model.generate(...)`` (the prefill and every decode step
        keep the batch's order: one id per sequence; with ``num_beams`` or ``num_return_sequences`` > 1
        generate expands the batch, so repeat_interleave the ids to match, or call :meth:`generate`,
        which does; an encoder-decoder's encoder, run before the expansion, takes every e-th id).
        Under ``torch.autocast`` each row computes what its adapter alone computes under it. DoRA's and
        Simple DoRA's row scales are derived here from the base weights as they are now (for the slots
        named): change the base between requests, not inside a context. Inference only: run it under
        ``torch.no_grad()`` or ``torch.inference_mode()``; inputs that require grad are refused. The
        bank cannot be changed while in use, and contexts do not nest.
        """
        if self._active is not None:
            raise RuntimeError("AdapterBank.use: the bank is already in use (contexts do not nest)")
        for name, layer in self._modules.items():
            if layer.bank_route is not None:
                raise RuntimeError(f"AdapterBank.use: layer {name!r} is already routed by another bank's use() "
                                   "context; contexts do not nest, across banks either")
            if not same_device(layer.weight.device, self.device):
                raise RuntimeError(f"AdapterBank.use: layer {name!r} is now on {layer.weight.device} but the bank "
                                   f"is on {self.device}; call bank.to(device) after moving the model")
            if layer.merged:
                raise RuntimeError(f"AdapterBank.use: layer {name!r} was merged after the bank was made; unmerge first")
        rows = AdapterRows(adapter_ids, self._capacity, occupied=[n is not None for n in self._names],
                           device=self.device, names=self.adapters)
        self._refresh_magnitudes(rows)
        self._active = rows

        # The shape of each model call, for layers that see its tokens flattened and for an encoder run
        # before generate expands the batch (AdapterRows.fit): the root and every transformers model
        # inside it (a VLM's language model, an encoder-decoder's encoder) push their call's frame
        # and pop it when the call ends, so an inner call neither clears nor inherits the outer one.
        encoders = {id(e) for e in self._encoders}

        def enter(module, args, kwargs):
            frame = _call_frame(args, kwargs)
            if frame is not None and not rows.frames and id(module) in encoders:  # generate's encoder call
                frame = frame._replace(before_expansion=True)
            rows.frames.append(frame)

        def leave(module, args, output):
            rows.frames.pop()

        hooks = []
        for module in self._calls:
            hooks += [module.register_forward_pre_hook(enter, with_kwargs=True),
                      module.register_forward_hook(leave, always_call=True)]
        for name, layer in self._modules.items():
            layer.bank_route = self._routes[name]
        try:
            yield rows
        finally:
            for layer in self._modules.values():
                layer.bank_route = None
            for hook in hooks:
                hook.remove()
            self._active = None

    @_normal_tensors
    def _refresh_magnitudes(self, rows: AdapterRows) -> None:
        """The row scales (and Simple DoRA's v ||W||) of the DoRA and Simple DoRA slots ``rows`` name,
        from each layer's base weight as it is now: once per request, not per call (writes that move no
        tensor version, ``.data`` or a fused optimizer's, leave no trace a check per call could read)."""
        if not any(s.magnitudes for s in self._layers.values()):
            return
        named = set(rows.host.unique().tolist())
        for ln, s in self._layers.items():
            slots = sorted(named.intersection(s.magnitudes))
            if slots:
                s.refresh(slots, self._modules[ln].weight_nk())

    def generate(self, input_ids: torch.Tensor, adapter_ids, **kwargs) -> torch.Tensor:
        """``model.generate(input_ids, **kwargs)`` with prompt i answered by adapter ``adapter_ids[i]``
        (one id per prompt; with ``num_beams`` or ``num_return_sequences`` > 1, repeated here for the
        prompt's copies as ``generate`` expands the batch)."""
        copies = _generate_copies(self.model, kwargs)
        prompts = next((t.shape[0] for t in (input_ids, *map(kwargs.get, ("inputs_embeds", "input_features",
                                                                           "pixel_values", "input_values")))
                        if isinstance(t, torch.Tensor)), None)
        if isinstance(adapter_ids, (list, tuple)):
            adapter_ids = torch.tensor(adapter_ids, dtype=torch.int64, device=self.device) \
                if all(isinstance(i, int) and not isinstance(i, bool) for i in adapter_ids) else adapter_ids
        if copies > 1 and isinstance(adapter_ids, torch.Tensor) and adapter_ids.dim() == 1 \
                and len(adapter_ids) == prompts:
            adapter_ids = adapter_ids.repeat_interleave(copies)
        with torch.no_grad(), self.use(adapter_ids):
            return self.model.generate(input_ids, **kwargs)

    @_normal_tensors
    def to(self, device) -> "AdapterBank":
        """Move the bank's tensors to ``device``, the device the model's adapted layers are on (move the
        model first); any other device is refused before anything moves. Devices only: the factors'
        dtype is the bank's ``factor_dtype``, fixed when it is made (U, V and row scales are fp32)."""
        self._refuse_in_use("to")
        if isinstance(device, torch.dtype):
            raise TypeError(f"AdapterBank.to: device must be a device, got the dtype {device}; the bank moves between "
                            f"devices only: its factor_dtype ({self.factor_dtype}) is fixed when it is made (make a "
                            "new AdapterBank(model, factor_dtype=...) for another)")
        # the device as a tensor reports it ("cuda" given: cuda:0), as the layers' weights report theirs
        device = torch.empty(0, device=device).device
        layer_devices = {layer.weight.device for layer in self._modules.values()}
        if layer_devices != {device}:  # elsewhere the bank could serve no request (meta: its adapters' values lost)
            raise ValueError(f"AdapterBank.to: device must be the device the model's adapted layers are on now "
                             f"({', '.join(sorted(map(str, layer_devices)))}), got {device}; move the model first")
        for s in self._layers.values():
            ref = {k: (r.to(device) if r is not None else None) for k, r in s.ref.items()}
            for k, t in s.tensors().items():
                if t is not None:
                    setattr(s, k, ref[k] if k in ref and t is s.ref[k] else t.to(device))
            s.ref, s.device = ref, device
            s.magnitudes = {slot: mag._replace(m=mag.m.to(device), v=mag.v.to(device) if mag.v is not None else None)
                            for slot, mag in s.magnitudes.items()}
        self.device = device
        return self

    def _refuse_in_use(self, what: str) -> None:
        if self._active is not None:
            raise RuntimeError(f"AdapterBank.{what}: the bank is in use (inside bank.use(...)); change it between "
                               "requests")

    def _read_directory(self, directory: Path) -> dict:
        """Effective tensors of a saved adapter: loaded into a shell of this model's linear layers that
        shares their weights (nothing of the model is copied or changed), with load_adapter's checks."""
        shell = linear_shell(self.model)
        frozen = {id(p): p.requires_grad for p in self.model.parameters()}
        try:
            load_adapter(shell, directory)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"AdapterBank.add: adapter {str(directory)!r} does not fit the bank's model: {e}") from None
        finally:  # inject freezes the shell's parameters, which are the model's own
            for p in self.model.parameters():
                if p.requires_grad != frozen[id(p)]:  # only those: an inference tensor refuses the call
                    p.requires_grad_(frozen[id(p)])
        return _effective_tensors(shell)

    def _prepare(self, effective: dict) -> dict:
        """layer name -> (A (R, K), B (N, R) in factor_dtype, U row (R,) fp32, v (N,), c (N,), a
        :class:`_Magnitude` or None) on the bank's device, after checking every layer; raises
        ValueError naming the first misfit."""
        unknown = sorted(set(effective) - set(self._layers))
        if unknown:
            raise ValueError(f"AdapterBank.add: the adapter adapts layers the bank's model does not adapt: "
                             f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (inject the model with targets "
                             "covering them)")
        if not effective:
            raise ValueError("AdapterBank.add: the adapter adapts no layer")
        out, finite = {}, []
        R = self.rank
        for ln, e in effective.items():
            if not isinstance(e, LayerAdapter):
                e = LayerAdapter(*e)
            s = self._layers[ln]
            # the op's checks (tensors on any device holding values: they are copied to the bank's)
            where = f"AdapterBank.add: layer {ln!r}"
            r = check_adapter_tensors(where, s.N, s.K, e.A, e.B, e.u, e.v, e.row_scale, device=None)
            check_scaling(where, e.scaling)
            mag = self._magnitude(where, s.N, e)
            if r > R:
                raise ValueError(f"AdapterBank.add: layer {ln!r} has rank {r}, above the bank's rank {R} "
                                 "(make the bank with AdapterBank(model, rank=...))")
            A, B = e.A.detach(), e.B.detach()
            dev = self.device
            A_pad = torch.zeros((R, s.K), device=dev, dtype=self.factor_dtype)
            A_pad[:r] = A.to(dev, self.factor_dtype)
            B_pad = torch.zeros((s.N, R), device=dev, dtype=self.factor_dtype)
            B_pad[:, :r] = B.to(dev, self.factor_dtype)
            U_row = torch.zeros(R, device=dev, dtype=torch.float32)
            U_row[:r] = float(e.scaling) * (e.u.detach().to(dev, torch.float32) if e.u is not None else 1.0)
            v = e.v.detach().to(dev, torch.float32) if e.v is not None else None
            c = e.row_scale.detach().to(dev, torch.float32) if e.row_scale is not None else None
            if mag is not None and mag.kind == "simple_dora":
                v = None  # its V row is v ||W||, written when a request names the slot
            for what, t in (("A", A_pad), ("B", B_pad), ("u", U_row), ("v", v), ("row_scale", c),
                            ("m", mag.m if mag is not None else None), ("v", mag.v if mag is not None else None)):
                if t is not None:
                    finite.append((ln, what, torch.isfinite(t).all()))
            out[ln] = (A_pad, B_pad, U_row, v, c, mag)
        flags = torch.stack([f for _, _, f in finite]).tolist()  # one host sync for every check
        for (ln, what, _), ok in zip(finite, flags):
            if not ok:
                raise ValueError(f"AdapterBank.add: layer {ln!r}: {what} holds inf or NaN")
        return out

    def _magnitude(self, where: str, N: int, e: LayerAdapter) -> Optional[_Magnitude]:
        """The :class:`_Magnitude` of a DoRA or Simple DoRA entry on the bank's device (None: none)."""
        if e.magnitude not in MAGNITUDES:
            raise ValueError(f"{where}: magnitude must be one of {', '.join(MAGNITUDES)}, got {e.magnitude!r}")
        if e.magnitude == "none":
            if e.m is not None:
                raise ValueError(f"{where}: m is given but magnitude is 'none' (give magnitude='dora' or "
                                 "'simple_dora' for a row scale derived from the base weight)")
            return None
        if e.row_scale is not None:
            raise ValueError(f"{where}: a {e.magnitude} layer's row scale is derived from the base weight and its m; "
                             "give row_scale=None")
        _check_tensor("m", e.m, (N,), None, where)
        v = e.v.detach() if e.v is not None else torch.ones(N, dtype=e.B.dtype, device=e.B.device)
        # copies: a live source model's later changes must not reach the slot
        return _Magnitude(e.magnitude, e.m.detach().to(self.device, copy=True),
                          v.to(self.device, copy=True) if e.magnitude == "simple_dora" else None)

    def _matches(self, entries: dict) -> dict:
        """layer name -> {"A": bool, "B": bool}: whether the entry's factor equals the layer's reference
        one (shared, or what the agreeing slots hold); one host sync for all layers."""
        keys, tests = [], []
        for ln, (A, B, *_rest) in entries.items():
            s = self._layers[ln]
            for k, new in (("A", A), ("B", B)):
                ref = s.ref[k]
                if ref is not None:
                    keys.append((ln, k))
                    tests.append((ref == new).all())
        out: dict = {}
        for (ln, k), eq in zip(keys, torch.stack(tests).tolist() if tests else []):
            out.setdefault(ln, {})[k] = eq
        return out


def _effective_tensors(model: nn.Module) -> dict[str, LayerAdapter]:
    """layer name -> :class:`LayerAdapter` of every adapted layer of an injected ``model``."""
    adapter_config(model)
    out = {}
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            if layer.merged:
                raise ValueError(f"AdapterBank.add: layer {name!r} of the source model is merged; unmerge it first")
            A, B, u, v, c = layer.op_tensors()
            if layer.magnitude != "none":  # kept as m (and Simple DoRA's v): the bank derives c from W at use()
                v, c = layer.adapter_v, None
            out[name] = LayerAdapter(A, B, u, v, c, layer.scaling, layer.magnitude,
                                     layer.adapter_m if layer.magnitude != "none" else None)
    return out


__all__ = ["AdapterBank", "LayerAdapter", "MAGNITUDES", "ROUTES"]
