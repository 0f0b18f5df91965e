"""Put adapters into any ``nn.Module`` (transformers models included), and take them out again.

``inject`` freezes the model, groups the targeted layers by kind (the last component of the
module name: every layer's ``q_proj`` is one kind), builds one :class:`TiedFactors` per kind (or
per layer when untied), replaces each target by a :class:`TiedLoRALinear`, and attaches the
factors once to the model root as ``model.tiedlora``.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

from ..config import TiedLoRAConfig
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
    if isinstance(module, nn.Linear):
        return "linear"
    # transformers' Conv1D (GPT-2): weight stored (in, out). Matched by name so transformers stays optional.
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def _in_out(module: nn.Module, layout: str) -> tuple[int, int]:
    w = module.weight
    return (w.shape[1], w.shape[0]) if layout == "linear" else (w.shape[0], w.shape[1])


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def find_targets(model: nn.Module, config: TiedLoRAConfig) -> list[TargetLayer]:
    """The layers ``config.target_modules`` selects, in module order. Raises if none, or if a
    listed name matches no ``nn.Linear`` / ``Conv1D``."""
    candidates = [(n, m, _layout_of(m)) for n, m in model.named_modules()]
    candidates = [(n, m, lay) for n, m, lay in candidates
                  if lay is not None and not n.startswith(ROOT_ATTR + ".")]
    excluded = lambda n: any(_name_matches(n, e) for e in config.exclude_modules)  # noqa: E731
    tm = config.target_modules
    if isinstance(tm, str) and tm == "all-linear":
        chosen = [(n, m, lay) for n, m, lay in candidates if not excluded(n)]
    elif isinstance(tm, str):
        rx = re.compile(tm)
        chosen = [(n, m, lay) for n, m, lay in candidates if rx.fullmatch(n) and not excluded(n)]
    else:
        chosen = [(n, m, lay) for n, m, lay in candidates if any(_name_matches(n, t) for t in tm)]
        for t in tm:
            if not any(_name_matches(n, t) for n, _, _ in chosen):
                kinds = sorted({n.rsplit(".", 1)[-1] for n, _, _ in candidates})
                raise ValueError(f"inject: target_modules entry {t!r} matches no nn.Linear / Conv1D in "
                                 f"{type(model).__name__}; available kinds: {kinds}")
    if not chosen:
        kinds = sorted({n.rsplit(".", 1)[-1] for n, _, _ in candidates})
        raise ValueError(f"inject: target_modules={tm!r} matches no nn.Linear / Conv1D in "
                         f"{type(model).__name__}; available kinds: {kinds}")
    out = []
    for n, m, lay in chosen:
        K, N = _in_out(m, lay)
        out.append(TargetLayer(n, n.rsplit(".", 1)[-1], lay, K, N))
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
    """The A (r, K), B (N, r) of one group, initialised as the config says (seeded per group)."""
    p = config.resolved()
    r = config.rank
    tensors = {}
    for name, shape in (("A", (r, K)), ("B", (N, r))):
        spec = getattr(p, name)
        if torch.device(device).type == "meta":
            tensors[name] = torch.empty(shape, device="meta", dtype=dtype)
            continue
        divisor = config.gamma if name in config.gamma_factors else 1.0
        t = init_factor(shape, spec.init, _generator(config.seed, group, name), divisor)
        tensors[name] = t.to(device=device, dtype=dtype)
    return TiedFactors(tensors["A"], tensors["B"], p.A.train, p.B.train)


def group_name(target: TargetLayer, tied: bool) -> str:
    return target.kind if tied else target.name.replace(".", "__")


def inject(model: nn.Module, config: TiedLoRAConfig) -> nn.Module:
    """Freeze ``model`` and replace every targeted ``nn.Linear`` / ``Conv1D`` by a :class:`TiedLoRALinear`.

    Args:
        model: any module; transformers models built from a config, loaded, or on the meta device.
        config: the :class:`TiedLoRAConfig`.

    Returns:
        The same model object, modified in place. Adapter tensors are created on each layer's
        device in ``config.adapter_dtype``. ``model.tiedlora`` holds the tied factors (once).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4))
        >>> inject(model, TiedLoRAConfig(rank=8, preset="tl6", target_modules=["c_attn"]))
    """
    if not isinstance(config, TiedLoRAConfig):
        raise TypeError(f"inject: config must be a TiedLoRAConfig, got {type(config).__name__}")
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        # The factors are attached to the root as a child module, which a Sequential would call.
        raise TypeError(f"inject: the root is an nn.{type(model).__name__}; wrap it in an nn.Module first")
    if hasattr(model, ROOT_ATTR):
        raise ValueError(f"inject: the model already has tiedlora adapters (model.{ROOT_ATTR}); "
                         "inject once, or build a fresh model")
    targets = find_targets(model, config)
    p = config.resolved()
    r = config.rank
    for t in targets:
        if r > min(t.in_features, t.out_features):
            raise ValueError(f"inject: rank={r} is larger than layer {t.name!r} "
                             f"(in_features={t.in_features}, out_features={t.out_features}); "
                             "a low-rank adapter needs rank <= min(in, out)")
    for prm in model.parameters():
        prm.requires_grad_(False)

    modules = dict(model.named_modules())
    groups: dict[str, list[TargetLayer]] = defaultdict(list)
    for t in targets:
        groups[group_name(t, p.tied)].append(t)

    factors = AdapterFactors()
    for g, members in groups.items():
        w = modules[members[0].name].weight
        dtype = config.torch_adapter_dtype or w.dtype
        K = max(t.in_features for t in members)
        N = max(t.out_features for t in members)
        factors[g] = build_factors(config, g, K, N, w.device, dtype)

    for g, members in groups.items():
        for t in members:
            base = modules[t.name]
            w = base.weight
            dtype = config.torch_adapter_dtype or w.dtype
            u = v = None
            if p.u.init is not None:
                u = nn.Parameter(torch.full((r,), float(p.u.init), device=w.device, dtype=dtype),
                                 requires_grad=p.u.train)
            if p.v.init is not None:
                v = nn.Parameter(torch.full((t.out_features,), float(p.v.init), device=w.device, dtype=dtype),
                                 requires_grad=p.v.train)
            layer = TiedLoRALinear(base.weight, base.bias, layout=t.layout, factors=factors[g], u=u, v=v,
                                   scaling=config.scaling, dropout=config.dropout, kind=t.kind)
            layer.train(base.training)
            parent_name, _, child = t.name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, layer)

    model.add_module(ROOT_ATTR, factors)
    factors.config = config
    return model


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, TiedLoRALinear]]:
    """(name, layer) for every :class:`TiedLoRALinear` in ``model``."""
    for n, m in model.named_modules():
        if isinstance(m, TiedLoRALinear):
            yield n, m


def adapter_config(model: nn.Module) -> TiedLoRAConfig:
    """The config ``inject`` used on ``model``; raises if it has no adapters."""
    holder = getattr(model, ROOT_ATTR, None)
    if not isinstance(holder, AdapterFactors):
        raise ValueError(f"{type(model).__name__} has no tiedlora adapters: call tiedlora_kernels.inject first")
    return holder.config


def adapter_named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every adapter tensor (trained or frozen) by its ``state_dict`` name: the factors under
    ``tiedlora.``, and each layer's ``adapter_u`` / ``adapter_v``."""
    adapter_config(model)
    for n, prm in getattr(model, ROOT_ATTR).named_parameters():
        yield f"{ROOT_ATTR}.{n}", prm
    for name, layer in adapted_layers(model):
        for pn in ("adapter_u", "adapter_v"):
            prm = getattr(layer, pn)
            if prm is not None:
                yield f"{name}.{pn}", prm


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (fp32 arithmetic, dtype kept): zero adapter overhead."""
    adapter_config(model)
    for _, layer in adapted_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge` on every adapted layer."""
    adapter_config(model)
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def trainable_parameters(model: nn.Module) -> dict:
    """Trainable adapter parameters, in total and per kind, split into A, B, u, v.

    Returns ``{"total": int, "kinds": {kind: {"layers": L, "A": n, "B": n, "u": n, "v": n,
    "total": n}}}``. Tied tensors count once. Compare with :func:`expected_trainable_parameters`.
    """
    adapter_config(model)
    kinds: dict[str, dict] = {}
    seen: set[int] = set()
    for _, layer in adapted_layers(model):
        k = kinds.setdefault(layer.kind, {"layers": 0, "A": 0, "B": 0, "u": 0, "v": 0, "total": 0})
        k["layers"] += 1
        f = layer.factors
        for key, prm in (("A", f.A), ("B", f.B), ("u", layer.adapter_u), ("v", layer.adapter_v)):
            if prm is not None and prm.requires_grad and id(prm) not in seen:
                seen.add(id(prm))
                k[key] += prm.numel()
                k["total"] += prm.numel()
    return {"total": sum(k["total"] for k in kinds.values()), "kinds": kinds}


def expected_trainable_parameters(config: TiedLoRAConfig, layers: list[tuple[str, int, int]]) -> int:
    """Table 1's count, generalised: ``layers`` lists (kind, K, N) per adapted layer.

    Per kind with L layers and r = rank: trained A costs r*K (tied, K the kind's largest) or
    sum r*K_i (untied); B likewise N*r; u costs L*r; v costs sum N_i.
    """
    p = config.resolved()
    r = config.rank
    by_kind: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for kind, K, N in layers:
        by_kind[kind].append((K, N))
    total = 0
    for shapes in by_kind.values():
        Ks, Ns = [k for k, _ in shapes], [n for _, n in shapes]
        if p.A.train:
            total += r * (max(Ks) if p.tied else sum(Ks))
        if p.B.train:
            total += r * (max(Ns) if p.tied else sum(Ns))
        if p.u.train:
            total += r * len(shapes)
        if p.v.train:
            total += sum(Ns)
    return total
