"""Put adapters into any ``nn.Module`` (transformers models included), and take them out again.

``inject`` freezes the model, groups the targeted layers by kind, builds one :class:`TiedFactors`
per kind (or per layer when untied), replaces each target by a :class:`TiedLoRALinear`, and
attaches the factors once to the model root as ``model.tiedlora``.

Kinds (the paper ties per weight type). With ``kind_rule="path"`` (the default) a layer's kind is
derived from its module path in two steps:

1. its *type path*: the path with every purely numeric component removed except the last
   (``transformer.h.3.attn.c_proj`` -> ``transformer.h.attn.c_proj``, ``model.layers.0.mlp.down_proj``
   -> ``model.layers.mlp.down_proj``). Layer and expert indices go, so every block's layer of one
   role has one type; a trailing index stays, since the positions of an ``nn.Sequential``
   (``mlp.0``, ``mlp.2``) are different layers;
2. its *kind*: the shortest dotted suffix of the type path, not starting with a number, that is
   not also a suffix of another type path among the model's ``nn.Linear`` / ``Conv1D`` layers
   (all of them, targeted or not, so a layer's kind does not depend on what else is targeted).

So LLaMA-style names stay as they are (``q_proj``, ``down_proj``), GPT-2's attention output and MLP
down projections become ``attn.c_proj`` and ``mlp.c_proj`` (its ``c_attn``, ``c_fc`` stay), and an
encoder-decoder's ``encoder.layers.self_attn.q_proj`` is not tied to its decoder's. Tied factors
live under ``model.tiedlora[<kind with "." written "__">]`` (``tiedlora.attn__c_proj.A``).
``kind_rule="last"`` is the rule of format-1 adapter files: the last path component
(GPT-2's two ``c_proj`` tied as one kind). ``config.kinds`` overrides either rule per layer:
``{pattern: kind}``, patterns matched as PEFT matches ``alpha_pattern`` (a regex for a dotted suffix
of the path, the first match wins), e.g. ``{"c_proj": "c_proj"}`` ties GPT-2's two again, and
``{r"h\\.[0-5]\\.attn\\.c_attn": "low_attn"}`` gives the first six blocks' ``c_attn`` their own pair.
(A ``ModuleList`` of bare ``nn.Linear`` layers keeps its trailing indices, so each is its own
kind; tie them with ``kinds``.)
"""

from __future__ import annotations

import copy
import copyreg
import functools
import math
import re
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import reference
from ..bases import (has_own_forward, looks_like_quantized_linear, looks_quantized, quantized_base_of,
                     unsupported_quantized_error)
from ..config import TiedLoRAConfig, match_pattern
from ..modules import AdapterFactors, TiedFactors, TiedLoRALinear

#: Name of the root attribute holding every factor group.
ROOT_ATTR = "tiedlora"


@dataclass(frozen=True)
class TargetLayer:
    """A layer ``inject`` adapts: its full name, kind, layout and (K, N)."""

    name: str
    kind: str
    layout: str
    in_features: int
    out_features: int


def _layout_of(module: nn.Module) -> Optional[str]:
    """``linear``, ``conv1d``, ``quantized`` (a supported quantized kind, see ``bases.py``),
    ``unsupported-quantized`` (a linear whose weight is quantized by a library we do not support, or an
    ``nn.Linear`` subclass whose own forward does more than x W^T + b: never treated as dense) or None
    (not a layer we adapt)."""
    if quantized_base_of(module) is not None:
        return "quantized"
    if isinstance(module, nn.Linear):
        return "unsupported-quantized" if looks_quantized(module) or has_own_forward(module) else "linear"
    # transformers' Conv1D (GPT-2): weight stored (in, out). Matched by name so transformers stays optional.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "unsupported-quantized" if looks_quantized(module) else "conv1d"
    # another library's quantized linear that is no nn.Linear (HQQ, GPTQ, AWQ, EETQ layers): refused, not skipped
    if looks_like_quantized_linear(module):
        return "unsupported-quantized"
    return None


def _in_out(module: nn.Module, layout: str) -> tuple[int, int]:
    if layout == "quantized":
        return quantized_base_of(module).in_out(module)
    w = module.weight
    return (w.shape[1], w.shape[0]) if layout == "linear" else (w.shape[0], w.shape[1])


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def _self_and_ancestors(name: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b", "a.b.c"]``: an excluded name excludes everything inside it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def model_embedding(model: nn.Module, which: str) -> Optional[nn.Module]:
    """transformers' input embedding or output head (``get_input_embeddings()`` /
    ``get_output_embeddings()``, ``which`` = "input" / "output"), whatever its name, or None."""
    get = getattr(model, f"get_{which}_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def embedding_pair(model: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
    """(input embedding, output head) of a transformers model, each holding a ``weight`` tensor (tied when
    it is one tensor), or None."""
    pair = (model_embedding(model, "input"), model_embedding(model, "output"))
    return pair if all(isinstance(getattr(m, "weight", None), torch.Tensor) for m in pair) else None


def _weights_read_by_parent(model: nn.Module) -> dict[str, str]:
    """Layer name -> its parent's class, for the linears whose parent reads their weight and bias
    without calling them: torch's ``nn.MultiheadAttention`` passes ``out_proj.weight`` to its functional
    form, so an adapter on ``out_proj`` would get no gradient and change nothing until ``merge``; and
    ``nn.TransformerEncoderLayer``'s inference fast path reads ``linear1`` / ``linear2``'s weights (an
    adapter there would train, then be ignored in eval)."""
    return {f"{pn}.{cn}" if pn else cn: type(parent).__name__
            for pn, parent in model.named_modules() for cn, child in parent.named_children()
            if read_by_parent(parent, cn, child)}


#: transformers modules (by class name) that read some children's weights without calling them, on
#: some path: WavLM's attention passes q/k/v/out_proj's weights to ``F.multi_head_attention_forward``;
#: Mamba mixers multiply by ``dt_proj.weight`` on the CPU path, and mamba-ssm's CUDA kernels take
#: x_proj, dt_proj and out_proj's weights (only in_proj is called on every path); Gemma 3n's AltUp
#: reads ``correction_coefs.weight`` (clamped) in training.
CHILDREN_READ_BY_CLASS = {
    "WavLMAttention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    **{mixer: ("x_proj", "dt_proj", "out_proj") for mixer in ("MambaMixer", "FalconMambaMixer", "JambaMambaMixer")},
    # Mamba-2 and the hybrids built on its mixer: the fused CUDA path takes out_proj's weight.
    **{mixer: ("out_proj",) for mixer in ("Mamba2Mixer", "BambaMixer", "FalconH1Mixer", "GraniteMoeHybridMambaLayer",
                                          "NemotronHMamba2Mixer", "Zamba2MambaMixer")},
    "Gemma3nTextAltUp": ("correction_coefs",),
    # its factorised output head: hidden @ unembedding_projection.weight, then lm_head
    "NeoMMEForMaskedLM": ("unembedding_projection",),
}


def read_by_parent(parent: nn.Module, name: str, child: nn.Module) -> bool:
    """Whether ``parent`` reads its child ``name``'s weight without calling it (see
    :func:`_weights_read_by_parent`; ``child`` may be a PEFT layer wrapping the linear)."""
    return (isinstance(child, NonDynamicallyQuantizableLinear) or isinstance(parent, nn.MultiheadAttention)
            or (isinstance(parent, nn.TransformerEncoderLayer) and name in ("linear1", "linear2"))
            or name in CHILDREN_READ_BY_CLASS.get(type(parent).__name__, ()))


#: Names of MoE routers beyond ``DEFAULT_EXCLUDED_HEADS``' ``router`` (Doge, Gemma 3n's AltUp); every
#: linear inside a module whose class is a router (``...Router``, or an MoE ``...Gate``) is a router's
#: too (HunYuan's ``gate.wg``, Zaya's router MLP; not a linear attention's ``ForgetGate``).
ROUTER_NAMES = ("router_gate", "modality_router")


def _is_router_class(name: str) -> bool:
    return name.endswith("Router") or (name.endswith("Gate") and "moe" in name.lower())


def _router_layers(model: nn.Module) -> set[int]:
    """ids of the linears ``"all-linear"`` leaves out as routers under the ``heads`` rule: an adapter on
    one changes which experts every token goes to."""
    out = set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ROUTER_NAMES or _is_router_class(type(module).__name__):
            out.update(id(m) for m in module.modules())
    return out


def _output_head_layers(model: nn.Module, rule: str) -> set[int]:
    """ids of the modules ``"all-linear"`` leaves out as the output head under exclude rule ``rule``:
    every module inside ``get_output_embeddings()`` (a ``ModuleList`` of heads included), only that
    module itself (the ``module`` rule of older files), or none (``name``)."""
    head = model_embedding(model, "output") if rule != "name" else None
    if head is None:
        return set()
    return {id(m) for m in head.modules()} if rule == "heads" else {id(head)}


def _all_excluded(what: str, config: TiedLoRAConfig) -> ValueError:
    return ValueError(f"inject: {what} matches only layers that exclude_modules={config.exclude_modules!r} excludes "
                      "(the default keeps output heads frozen); pass exclude_modules without them to adapt those layers")


def find_targets(model: nn.Module, config: TiedLoRAConfig) -> list[TargetLayer]:
    """The layers ``config.target_modules`` selects, in module order. Raises if none, if a listed
    name matches no ``nn.Linear`` / ``Conv1D``, or if one selected is a layer no adapter can change."""
    candidates = [(n, m, _layout_of(m)) for n, m in model.named_modules()]
    candidates = [(n, m, lay) for n, m, lay in candidates
                  if lay is not None and not n.startswith(ROOT_ATTR + ".")]
    ex = config.exclude_modules
    by_module = config.exclude_rule != "name"
    excluded = (re.compile(ex).fullmatch if isinstance(ex, str)  # noqa: E731
                else lambda n: any(_name_matches(a, e) for e in ex
                                   for a in (_self_and_ancestors(n) if by_module else [n])))
    read_by_parent = _weights_read_by_parent(model) if config.exclude_rule == "heads" else {}
    tm = config.target_modules
    if isinstance(tm, str) and tm == "all-linear":
        head = _output_head_layers(model, config.exclude_rule)
        if config.exclude_rule == "heads":
            head |= _router_layers(model)
        chosen = [(n, m, lay) for n, m, lay in candidates
                  if not excluded(n) and id(m) not in head and n not in read_by_parent]
    elif isinstance(tm, str):
        rx = re.compile(tm)
        matched = [(n, m, lay) for n, m, lay in candidates if rx.fullmatch(n)]
        chosen = [(n, m, lay) for n, m, lay in matched if not excluded(n)]
        if matched and not chosen:
            raise _all_excluded(f"target_modules={tm!r}", config)
    else:
        listed = [(n, m, lay) for n, m, lay in candidates if any(_name_matches(n, t) for t in tm)]
        chosen = [(n, m, lay) for n, m, lay in listed if not excluded(n)]
        for t in tm:
            if not any(_name_matches(n, t) for n, _, _ in listed):
                kinds = sorted({n.rsplit(".", 1)[-1] for n, _, _ in candidates})
                raise ValueError(f"inject: target_modules entry {t!r} matches no nn.Linear / Conv1D in "
                                 f"{type(model).__name__}; available names: {kinds}")
            if not any(_name_matches(n, t) for n, _, _ in chosen):
                raise _all_excluded(f"target_modules entry {t!r}", config)
    if not chosen:
        if tm == "all-linear" and candidates:  # every linear layer is a head, a router or read by its parent
            names = [n for n, _, _ in candidates]
            raise ValueError(f"inject: target_modules='all-linear' leaves out output and task heads, routers and "
                             f"layers read by their parent, and {type(model).__name__} has no other nn.Linear / "
                             f"Conv1D: its linear layers are {names[:8]}{' ...' if len(names) > 8 else ''}; name "
                             "the ones to adapt in target_modules (and exclude_modules=[] for a head)")
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _, _ in candidates})
        raise ValueError(f"inject: target_modules={tm!r} matches no nn.Linear / Conv1D in "
                         f"{type(model).__name__}; available names: {kinds}")
    for n, _, _ in chosen:
        if n in read_by_parent:
            raise ValueError(f"inject: target_modules={tm!r} selects layer {n!r}, whose parent "
                             f"{read_by_parent[n]} reads its weight and bias directly and never calls it, so an "
                             f"adapter there would change nothing until merge; leave it out (add {n!r} to "
                             "exclude_modules, or narrow target_modules)")
    for n, m, lay in chosen:
        if lay == "unsupported-quantized":
            raise unsupported_quantized_error(n, m)
    kinds = layer_kinds([n for n, _, _ in chosen], [n for n, _, _ in candidates], config)
    out = []
    for n, m, lay in chosen:
        K, N = _in_out(m, lay)
        out.append(TargetLayer(n, kinds[n], lay, K, N))
    return out


def type_path(name: str) -> str:
    """``name`` without its numeric components but the last: the layer type it is an instance of."""
    parts = name.split(".")
    return ".".join([p for p in parts[:-1] if not p.isdigit()] + parts[-1:])


def layer_kinds(names: list[str], all_names: list[str], config: TiedLoRAConfig) -> dict[str, str]:
    """The kind of each module path in ``names`` (see the module docstring); ``all_names`` are every
    adaptable layer of the model, among which a ``path`` kind must be unique."""
    types = {type_path(n) for n in [*all_names, *names]}

    def shortest_unique_suffix(t: str) -> str:
        parts = t.split(".")
        for i in range(len(parts) - 1, -1, -1):
            if parts[i].isdigit():
                continue
            suffix = ".".join(parts[i:])
            if not any(o != t and (o == suffix or o.endswith("." + suffix)) for o in types):
                return suffix
        return t

    out = {}
    for n in names:
        explicit = match_pattern(config.kinds, n)
        if explicit is not None:
            out[n] = explicit
        elif config.kind_rule == "last":
            out[n] = n.rsplit(".", 1)[-1]
        else:
            out[n] = shortest_unique_suffix(type_path(n))
    return out


def _generator(seed: int, group: str, tensor: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{group}:{tensor}".encode()))


def init_factor(shape: tuple[int, int], init: str, gen: torch.Generator, divisor: float = 1.0) -> torch.Tensor:
    """A (r, K) or B (N, r) drawn on the CPU in fp32 (fan_in = shape[1]), divided by ``divisor``."""
    fan_in = shape[1]
    t = torch.empty(shape, dtype=torch.float32)
    if init == "zeros":
        return t.zero_()
    if init == "normal":
        t.normal_(0.0, 1.0, generator=gen)
    elif init == "kaiming_uniform":
        bound = math.sqrt(6.0 / fan_in)
        t.uniform_(-bound, bound, generator=gen)
    elif init == "lora_kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        t.uniform_(-bound, bound, generator=gen)
    else:
        raise ValueError(f"unknown factor init {init!r}")
    return t / divisor if divisor != 1.0 else t


def build_factors(config: TiedLoRAConfig, group: str, K: int, N: int, device, dtype) -> TiedFactors:
    """The factors of one group, initialised as the config says (seeded per group and tensor).

    A (r, K), B (N, r); with ``banks`` (kA, kB) the banks (kA, r, K), (kB, N, r), each slice drawn
    like the unbanked factor; with ``core="tensor"`` also LM (k, r, r) ~ N(0, 1/r).
    """
    p = config.resolved()
    r = config.rank
    kA, kB = p.banks or (None, None)
    on_meta = torch.device(device).type == "meta"
    tensors = {}
    for name, shape, bank in (("A", (r, K), kA), ("B", (N, r), kB)):
        full = shape if bank is None else (bank, *shape)
        if on_meta:
            tensors[name] = torch.empty(full, device="meta", dtype=dtype)
            continue
        spec = getattr(p, name)
        divisor = config.gamma if name in config.gamma_factors else 1.0
        draws = [init_factor(shape, spec.init, _generator(config.seed, group, name if bank is None else f"{name}{i}"),
                             divisor) for i in range(bank or 1)]
        t = draws[0] if bank is None else torch.stack(draws)
        tensors[name] = t.to(device=device, dtype=dtype)
    core_bank = None
    if p.core == "tensor":
        k = config.core_bank
        lm = (torch.empty((k, r, r), device="meta", dtype=dtype) if on_meta else
              (torch.randn((k, r, r), generator=_generator(config.seed, group, "LM")) / math.sqrt(r)).to(device, dtype))
        core_bank = lm
    return TiedFactors(tensors["A"], tensors["B"], p.A.train, p.B.train, core_bank)


def build_per_layer(config: TiedLoRAConfig, name: str, weight_nk: torch.Tensor, N: int, dtype) -> dict:
    """The per-layer parameters of one layer (see :class:`TiedLoRALinear`), seeded by layer name."""
    p = config.resolved()
    r = config.rank
    dev = weight_nk.device
    on_meta = dev.type == "meta"
    out = {}

    def param(t: torch.Tensor, train: bool = True) -> nn.Parameter:
        return nn.Parameter(t.to(device=dev, dtype=dtype), requires_grad=train)

    def mixing(k: int, tag: str) -> torch.Tensor:
        # N(0, 1/k): each layer starts from its own random combination of the bank.
        if on_meta:
            return torch.empty(k, device="meta")
        return torch.randn(k, generator=_generator(config.seed, name, tag)) / math.sqrt(k)

    if p.u.init is not None:
        out["adapter_u"] = param(torch.full((r,), float(p.u.init), device=dev), p.u.train)
    if p.v.init is not None:
        out["adapter_v"] = param(torch.full((N,), float(p.v.init), device=dev), p.v.train)
    if p.banks is not None:
        out["adapter_wA"] = param(mixing(p.banks[0], "wA"), p.A.train)
        out["adapter_wB"] = param(mixing(p.banks[1], "wB"), p.B.train)
    if p.core == "matrix":
        out["adapter_M"] = param(torch.eye(r, device=dev))
    elif p.core == "tensor":
        out["adapter_wM"] = param(mixing(config.core_bank, "wM"))
    if p.magnitude != "none":
        # m starts at ||W||_row (= ||W + dW||_row, dW = 0), so the layer starts as the identity change.
        norm = reference.row_norm(weight_nk).float() if not on_meta else torch.empty(N, device="meta")
        out["adapter_m"] = param(norm)
    return out


def group_name(target: TargetLayer, tied: bool) -> str:
    """Key of the target's factors in ``model.tiedlora``: its kind (tied) or its path (untied), with
    ``.`` written ``__`` (a module name cannot hold a dot)."""
    return (target.kind if tied else target.name).replace(".", "__")


def check_rank_fits(name: str, in_features: int, out_features: int, rank: int, op: str = "inject") -> None:
    """Raise unless a rank-``rank`` adapter fits layer ``name``."""
    if rank > min(in_features, out_features):
        raise ValueError(f"{op}: rank={rank} is larger than layer {name!r} (in_features={in_features}, "
                         f"out_features={out_features}); a low-rank adapter needs rank <= min(in, out)")


def base_in_out(name: str, module: nn.Module, op: str = "inject") -> tuple[int, int]:
    """(in_features, out_features) of layer ``name``; raises unless ``inject`` can adapt it."""
    layout = _layout_of(module)
    if layout == "unsupported-quantized":
        raise unsupported_quantized_error(name, module)
    if layout is None:
        raise ValueError(f"{op}: layer {name!r} adapts a {type(module).__name__}; only nn.Linear, Conv1D and the "
                         "supported quantized linears can be adapted")
    return _in_out(module, layout)


def inject(model: nn.Module, config: TiedLoRAConfig) -> nn.Module:
    """Freeze ``model`` and replace every targeted ``nn.Linear`` / ``Conv1D`` by a :class:`TiedLoRALinear`.

    Args:
        model: any module; transformers models built from a config, loaded, or on the meta device.
        config: the :class:`TiedLoRAConfig`.

    Returns:
        The same model object, modified in place. Adapter tensors are created on each layer's
        device in ``config.adapter_dtype``. ``model.tiedlora`` holds the tied factors (once).

    Side effects beyond the replaced layers: forward hooks on the model (and on each module that may
    be called on its own, e.g. ``model.model``) that make the shared fp32 casts of 16-bit tied factors
    per pass; a transformers model already gradient-checkpointing gets ``enable_input_require_grads()``
    (as PEFT does); a quantized transformers model whose quantizer says it cannot train
    (``is_qat_trainable``) gets a quantizer that says it can, so ``Trainer`` accepts it (only that
    model's quantizer object changes).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4))
        >>> inject(model, TiedLoRAConfig(rank=8, preset="tl6", target_modules=["c_attn"]))
    """
    if not isinstance(config, TiedLoRAConfig):
        raise TypeError(f"inject: config must be a TiedLoRAConfig, got {type(config).__name__}")
    # The model keeps its own copy: a caller reusing and changing one config object (a sweep) must
    # not change an injected model's; and fields set after construction are checked here.
    config = copy.deepcopy(config)
    config.validate()
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        # The factors are attached to the root as a child module, which a Sequential would call.
        raise TypeError(f"inject: the root is an nn.{type(model).__name__}; wrap it in an nn.Module first")
    if hasattr(model, ROOT_ATTR):
        raise ValueError(f"inject: the model already has tiedlora adapters (model.{ROOT_ATTR}); "
                         "inject once, or build a fresh model")
    peft_layers = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.tuners")]
    if peft_layers:  # adapting them would nest our adapters inside PEFT's and freeze PEFT's
        raise ValueError(f"inject: the model holds PEFT adapter layers ({peft_layers[:3]}...); convert them with "
                         "tiedlora_kernels.from_peft(peft_model), or start from the base model")
    # Every check that can refuse comes before the first change: a refused inject leaves the model as it was.
    targets = find_targets(model, config)
    if any(not t.name for t in targets):  # the root would have to replace itself
        raise TypeError(f"inject: the root is itself a layer to adapt ({type(model).__name__}); wrap it in an "
                        "nn.Module first")
    _warn_unmatched_patterns(config, [t.name for t in targets])
    p = config.resolved()
    r = config.rank
    for t in targets:
        check_rank_fits(t.name, t.in_features, t.out_features, r)
        if t.layout == "quantized":
            base = model.get_submodule(t.name)
            reason = quantized_base_of(base).not_ready(base)
            if reason:
                raise ValueError(f"inject: layer {t.name!r} ({type(base).__name__}): {reason}")
    groups: dict[str, list[TargetLayer]] = defaultdict(list)
    for t in targets:
        groups[group_name(t, p.tied)].append(t)
    reserved = {*dir(AdapterFactors()), "config"}  # attributes of the holder, not free as group names
    for g, members in groups.items():
        if len({t.kind for t in members}) > 1:
            raise ValueError(f"inject: kinds {sorted({t.kind for t in members})} would share the factors "
                             f"model.{ROOT_ATTR}[{g!r}] ('.' is written '__'); rename one in config.kinds")
        if g in reserved:
            raise ValueError(f"inject: kind {members[0].kind!r} (layer {members[0].name!r}) is a reserved name in "
                             f"model.{ROOT_ATTR}; give it another one in config.kinds")

    for prm in model.parameters():
        prm.requires_grad_(False)
    modules = dict(model.named_modules())
    # A module registered under several names (``self.b = self.a``) is replaced under every one of them.
    aliases: dict[int, list[str]] = defaultdict(list)
    for n, m in model.named_modules(remove_duplicate=False):
        aliases[id(m)].append(n)

    # Every quantized layer of the model, adapted or not, gets its kind's set-up: a 4-bit layer that
    # bitsandbytes repacks for CPU inference passes no gradient to its input, so an adapter anywhere
    # below it would get none.
    for module in model.modules():
        kind = quantized_base_of(module)
        if kind is not None:
            kind.prepare(module)

    factors = AdapterFactors()
    for g, members in groups.items():
        w = _dense_weight(modules[members[0].name], members[0].layout)
        K = max(t.in_features for t in members)
        N = max(t.out_features for t in members)
        factors[g] = build_factors(config, g, K, N, w.device, _adapter_dtype(config, w))

    for g, members in groups.items():
        for t in members:
            base = modules[t.name]
            w_nk = _dense_weight(base, t.layout)
            per_layer = build_per_layer(config, t.name, w_nk.detach(), t.out_features, _adapter_dtype(config, w_nk))
            common = dict(layout=t.layout, factors=factors[g], per_layer=per_layer, scaling=config.layer_scaling(t.name),
                          dropout=config.dropout, kind=t.kind, magnitude=p.magnitude)
            if t.layout == "quantized":  # the base layer is kept whole and computes its own output
                layer = TiedLoRALinear(None, None, base_layer=base, base_kind=quantized_base_of(base), **common)
            else:
                layer = TiedLoRALinear(base.weight, base.bias, **common)
            layer.train(base.training)
            for name in aliases[id(base)]:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, layer)

    model.add_module(ROOT_ATTR, factors)
    factors.config = config
    factors.watch(model)  # shared fp32 casts of bf16/fp16 tied factors, fresh for each forward pass
    _prepare_for_transformers_training(model)
    return model


def _prepare_for_transformers_training(model: nn.Module) -> None:
    """What transformers needs to train a model carrying our adapters, as PEFT's wrapping does for its own:

    - checkpointing already on: the input embeddings' output requires grad
      (``enable_input_require_grads``), or reentrant checkpointing (run without grad, then backward
      through its outputs) gives the adapters no gradient where the model's input is not ``input_ids``
      (transformers does it by itself only for those: ViT and Whisper trained nothing, or crashed);
    - a quantized model (``hf_quantizer``): ``Trainer`` refuses one that carries no PEFT adapter
      unless its quantizer says it trains (``is_qat_trainable``, read by that check alone). This
      model's quantizer (and only it) says so: :func:`_trains_with_adapters`."""
    # (transformers 5 renamed is_gradient_checkpointing, which now warns, to is_activation_checkpointing)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not getattr(quantizer, "is_qat_trainable", True):
        quantizer.__class__ = _trains_with_adapters(type(quantizer))


@functools.lru_cache(maxsize=None)
def _trains_with_adapters(quantizer_class: type) -> type:
    """``quantizer_class`` saying ``is_qat_trainable`` (its adapters train; the quantized weights stay
    frozen). A deepcopy keeps it; a pickle holds the quantizer it was (a class made here has no
    importable name)."""

    def reduce_as_original(self, protocol):
        return copyreg._reconstructor, (quantizer_class, object, None), self.__dict__

    def deepcopy_as_is(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    return type(quantizer_class.__name__, (quantizer_class,),
                {"is_qat_trainable": True, "__reduce_ex__": reduce_as_original, "__deepcopy__": deepcopy_as_is,
                 "__module__": __name__, "__qualname__": f"_trains_with_adapters.{quantizer_class.__name__}"})


def adapter_dtypes(model: nn.Module, config: TiedLoRAConfig, targets: list[TargetLayer]) -> dict[str, torch.dtype]:
    """The dtype ``inject`` gives each layer's own tensors (key: the layer's name) and each factor
    group (key: ``tiedlora.<group>``): ``config.adapter_dtype``, or with "auto" the base weight's (a
    group's: its first layer's)."""
    modules = dict(model.named_modules())
    tied = config.resolved().tied
    out: dict[str, torch.dtype] = {}
    for t in targets:
        # (with a fixed adapter_dtype no weight is looked at: a quantized one is not dequantized)
        dtype = config.torch_adapter_dtype or _adapter_dtype(config, _dense_weight(modules[t.name], t.layout))
        out[t.name] = dtype
        out.setdefault(f"{ROOT_ATTR}.{group_name(t, tied)}", dtype)
    return out


def _adapter_dtype(config: TiedLoRAConfig, weight_nk: torch.Tensor) -> torch.dtype:
    """The one rule: ``config.adapter_dtype``, or with "auto" the (dense) base weight's dtype."""
    return config.torch_adapter_dtype or weight_nk.dtype


def _dense_weight(module: nn.Module, layout: str) -> torch.Tensor:
    """The base weight as (N, K) floating point: a view for dense layers, the dequantized weight
    (a new tensor, compute dtype or fp32) for a quantized one."""
    if layout == "quantized":
        w = quantized_base_of(module).dequantized_weight(module)
        return w if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else w.float()
    return module.weight if layout == "linear" else module.weight.t()


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, TiedLoRALinear]]:
    """(name, layer) for every :class:`TiedLoRALinear` in ``model``."""
    for n, m in model.named_modules():
        if isinstance(m, TiedLoRALinear):
            yield n, m


def refuse_merged(model: nn.Module, caller: str) -> None:
    """Raise when any adapted layer of ``model`` is merged: writing its adapter tensors would leave
    the merged weight holding the old adapter, and ``unmerge`` would then subtract the new one's delta."""
    merged = [n for n, layer in adapted_layers(model) if layer.merged]
    if merged:
        more = f" and {len(merged) - 3} more" if len(merged) > 3 else ""
        raise ValueError(f"{caller}: {merged[:3]}{more} {'is' if len(merged) == 1 else 'are'} merged; call "
                         f"tiedlora_kernels.unmerge(model) first (its weights hold the current adapter)")


def adapter_config(model: nn.Module) -> TiedLoRAConfig:
    """The config ``inject`` used on ``model``; raises if it has no adapters."""
    holder = getattr(model, ROOT_ATTR, None)
    if not isinstance(holder, AdapterFactors):
        raise ValueError(f"{type(model).__name__} has no tiedlora adapters: call tiedlora_kernels.inject first")
    return holder.config


def adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every adapter tensor (trained or frozen) by its ``state_dict`` name: the factors under
    ``tiedlora.``, and each layer's own ``adapter_*`` parameters."""
    adapter_config(model)
    for n, prm in getattr(model, ROOT_ATTR).named_parameters():
        yield f"{ROOT_ATTR}.{n}", prm
    for name, layer in adapted_layers(model):
        for pn in TiedLoRALinear.PER_LAYER:
            prm = getattr(layer, pn)
            if prm is not None:
                yield f"{name}.{pn}", prm


@torch.no_grad()
def reset_adapters(model: nn.Module) -> nn.Module:
    """Re-draw every adapter tensor in place exactly as :func:`inject` draws it (same config seeds).

    For models injected on the meta device: after ``model.to_empty(device=...)`` and loading the
    base weights, the adapters hold uninitialised memory; this gives them the values ``inject``
    would have given on the loaded model (DoRA's magnitude m = ||W||_row from the loaded weights).
    Raises if a base weight or an adapter tensor is still on the meta device.
    """
    config = adapter_config(model)
    refuse_merged(model, "reset_adapters")
    layers = list(adapted_layers(model))
    for name, layer in layers:
        weight = layer.weight if layer.layout != "quantized" else layer.base_layer.weight
        for what, t in (("weight", weight), ("A", layer.factors.A)):
            if t.is_meta:
                raise RuntimeError(f"reset_adapters: {name}.{what} is on the meta device; materialise the model "
                                   "first (model.to_empty(device=...)) and load its base weights")
    for g, factors in getattr(model, ROOT_ATTR).items():
        K, N = factors.A.shape[-1], factors.B.shape[-2]
        fresh = build_factors(config, g, K, N, "cpu", torch.float32)
        for pn, prm in factors.named_parameters(recurse=False):
            prm.copy_(getattr(fresh, pn))
    for name, layer in layers:
        fresh = build_per_layer(config, name, layer.weight_nk().detach(), layer.out_features, torch.float32)
        for pn, value in fresh.items():
            getattr(layer, pn).copy_(value)
    return model


def refuse_nonfinite(tensors: dict[str, torch.Tensor], op: str, what: str = "tensor") -> None:
    """Refuse a floating tensor holding NaN or inf, naming it: a diverged adapter is no checkpoint (load_adapter
    refuses such a file, so saving one would replace a good checkpoint with one that never loads), and
    merged into a base weight it could not be taken out again."""
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{op}: {what} {name!r} holds non-finite values (NaN or inf)")


def _warn_unmatched_patterns(config: TiedLoRAConfig, names: list[str]) -> None:
    """Warn of ``alpha_pattern`` / ``kinds`` keys that match no adapted layer: a misspelt key changes
    nothing, silently (PEFT's rule; a warning, not an error, so PEFT configs still convert)."""
    for field in ("alpha_pattern", "kinds"):
        unmatched = [key for key in getattr(config, field) if not any(match_pattern({key: 1}, n) for n in names)]
        if unmatched:
            warnings.warn(f"inject: TiedLoRAConfig.{field} keys {unmatched} match no adapted layer; they change "
                          "nothing", UserWarning, stacklevel=3)


def refuse_sharded(layers: list[tuple[str, TiedLoRALinear]], op: str, remedy: str) -> None:
    """Raise, naming the first, for an adapted layer holding FSDP2 shards (DTensors): its base weight or an
    adapter tensor, its own or its kind's tied factors. Each rank holds only its part of them, outside the
    forward that gathers them; ``remedy`` says what to do instead."""
    for name, layer in layers:
        for t in (*layer.parameters(), *layer.factors.parameters()):
            if hasattr(t, "full_tensor"):
                raise ValueError(f"{op}: layer {name!r} holds sharded (FSDP2 / DTensor) tensors; {remedy}")


#: What to do instead of merging or unmerging a sharded model (the weights to rewrite are split across ranks).
_UNSHARDED_COPY = ("gather it first: save_adapter(model, dir) on every rank, then load_adapter into an unsharded "
                   "copy of the model (in one process) and {op} that")


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (fp32 arithmetic, dtype kept): zero adapter overhead.

    Refused, before any layer changes, when an adapted layer's weight is also another module's
    (tied input and output embeddings with ``lm_head`` adapted): merging would change both, when
    an adapter holds NaN or inf (folded in, it could not be taken out again), or when the model is
    sharded (FSDP2)."""
    adapter_config(model)
    refuse_sharded(list(adapted_layers(model)), "merge", _UNSHARDED_COPY.format(op="merge"))
    refuse_nonfinite(dict(adapter_named_parameters(model)), "merge", "adapter tensor")
    shared = shared_weights(model)
    if shared:
        name, others = next(iter(shared.items()))
        raise ValueError(f"merge: layer {name!r} shares its weight with {others} (tied weights); merging would "
                         "add its adapter to those too. Keep the model unmerged, or untie the weights (e.g. "
                         "clone the lm_head weight) before inject")
    for _, layer in adapted_layers(model):
        layer.merge()
    return model


def shared_weights(model: nn.Module) -> dict[str, list[str]]:
    """Adapted layer name -> the other parameter names its base weight is registered under (tied
    embeddings: ``lm_head.weight`` is ``model.embed_tokens.weight``); only layers with such names."""
    names: dict[int, list[str]] = {}
    for n, prm in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(prm), []).append(n)
    out = {}
    for name, layer in adapted_layers(model):
        if layer.layout == "quantized":
            continue
        # (names under which this same layer is registered, ``self.b = self.a``, are no other module)
        others = [n for n in names.get(id(layer.weight), [])
                  if model.get_submodule(n.rpartition(".")[0]) is not layer]
        if others:
            out[name] = others
    return out


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every adapted layer; refused for a sharded (FSDP2) model, before any layer changes."""
    adapter_config(model)
    refuse_sharded(list(adapted_layers(model)), "unmerge", _UNSHARDED_COPY.format(op="unmerge"))
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


#: Keys of :func:`trainable_parameters`' per-kind breakdown, and the tensors they count.
_COUNT_KEYS = {"A": ("A",), "B": ("B",), "u": ("adapter_u",), "v": ("adapter_v",),
               "banks_w": ("adapter_wA", "adapter_wB"), "core": ("adapter_M", "adapter_wM", "core_bank"),
               "m": ("adapter_m",)}


def trainable_parameters(model: nn.Module) -> dict:
    """Trainable adapter parameters, in total and per kind.

    Returns ``{"total": int, "kinds": {kind: {"layers": L, "A": n, "B": n, "u": n, "v": n,
    "banks_w": n, "core": n, "m": n, "total": n}}}``. Tied tensors count once. Compare with
    :func:`expected_trainable_parameters`.
    """
    adapter_config(model)
    kinds: dict[str, dict] = {}
    seen: set[int] = set()
    for _, layer in adapted_layers(model):
        k = kinds.setdefault(layer.kind, {"layers": 0, **{key: 0 for key in _COUNT_KEYS}, "total": 0})
        k["layers"] += 1
        for key, names in _COUNT_KEYS.items():
            for n in names:
                prm = getattr(layer.factors if n in ("A", "B", "core_bank") else layer, n)
                if prm is not None and prm.requires_grad and id(prm) not in seen:
                    seen.add(id(prm))
                    k[key] += prm.numel()
                    k["total"] += prm.numel()
    return {"total": sum(k["total"] for k in kinds.values()), "kinds": kinds}


def expected_trainable_parameters(config: TiedLoRAConfig, layers: list[tuple[str, int, int]]) -> int:
    """Table 1's count, generalised to every variant: ``layers`` lists (kind, K, N) per adapted layer.

    Per kind with L layers, r = rank, K/N the kind's largest (tied) or each layer's (untied):
    trained A costs r*K (tied), sum r*K_i (untied), or kA*r*K + L*kA with banks; B likewise
    with N and kB; u costs L*r, v sum N_i; core ``matrix`` L*r^2, ``tensor`` k*r^2 + L*k;
    a magnitude sum N_i.
    """
    p = config.resolved()
    r = config.rank
    by_kind: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for kind, K, N in layers:
        by_kind[kind].append((K, N))
    total = 0
    for shapes in by_kind.values():
        L = len(shapes)
        Ks, Ns = [k for k, _ in shapes], [n for _, n in shapes]
        kA, kB = p.banks or (1, 1)
        if p.A.train:
            total += r * (max(Ks) if p.tied else sum(Ks)) * kA + (L * kA if p.banks else 0)
        if p.B.train:
            total += r * (max(Ns) if p.tied else sum(Ns)) * kB + (L * kB if p.banks else 0)
        if p.u.train:
            total += r * L
        if p.v.train:
            total += sum(Ns)
        if p.core == "matrix":
            total += L * r * r
        elif p.core == "tensor":
            total += config.core_bank * r * r + L * config.core_bank
        if p.magnitude != "none":
            total += sum(Ns)
    return total
