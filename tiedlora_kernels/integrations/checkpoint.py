"""Adapter checkpoints: one safetensors file (no pickle), written atomically, verified on load.

Layout of ``<dir>/adapter_model.safetensors``: every trained adapter tensor under its
``state_dict`` name, plus any frozen one that the config's seed cannot rebuild (e.g. VeRA
projections converted from PEFT). Its metadata holds the config, the adapted layers and a
SHA-256 of the tensor contents, so the file alone is the whole checkpoint; ``adapter_config.json``
beside it is a human-readable copy. Optimizer state can ride along in
``optimizer.safetensors`` (keyed by parameter name, not position).

Format versions (``FORMAT_VERSION`` is written, every one of ``READABLE_VERSIONS`` loads as it was
written): ``2`` adds the config fields ``alpha_pattern``, ``kind_rule`` and ``kinds``; files of
format ``1`` have kinds by the rule of the time (``kind_rule="last"``: the last module path
component) and no per-layer alphas. ``3`` adds ``exclude_rule`` (default ``"module"``); ``4`` makes
it ``"heads"`` (task heads, routers and layers their parent reads directly left out of all-linear):
older files load with the layers they were saved with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..config import TiedLoRAConfig
from .inject import (ROOT_ATTR, adapted_layers, adapter_config, adapter_dtypes, adapter_named_parameters,
                     build_factors, find_targets, inject, refuse_merged, refuse_nonfinite)
from .shell import linear_shell

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT = "tiedlora-adapter"
FORMAT_VERSION = "4"
#: Versions ``load_adapter`` reads; the config fields each one lacks take these values (format 3 added
#: exclude_rule: files saved before select their layers by the older rule).
READABLE_VERSIONS = {"1": {"kind_rule": "last", "exclude_rule": "name"}, "2": {"exclude_rule": "name"}, "3": {},
                     "4": {}}


def content_hash(tensors: dict[str, torch.Tensor], *texts: str) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order, then over ``texts`` (metadata)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(tensors[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for text in texts:
        h.update(b"|" + text.encode())
    return h.hexdigest()


def _atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync and rename over ``path``: a crash leaves the old file intact."""
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, usual_mode(0o666))  # mkstemp makes 0600; a saved adapter gets the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(path) -> None:
    """fsync a directory, so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def usual_mode(mode: int) -> int:
    """``mode`` less the process umask: what a plain ``open`` would give (tempfile and safetensors
    create 0600 files, which another user, say a serving container, could not read)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this rank's CPU: FSDP2 shards (DTensors) are gathered (a collective:
    every rank must call save_adapter)."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.to("cpu").contiguous()


def unwrapped(model: nn.Module) -> nn.Module:
    """``model`` without the wrappers of ``torch.compile`` (``OptimizedModule``) and of
    ``DistributedDataParallel`` / ``DataParallel``. They hold the model as a submodule (``_orig_mod``,
    ``module``), so every name read through them carries that prefix: a file written from one fits no
    plain model (PEFT matches none of its keys and serves the bare base model)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        # torch.compile imported torch._dynamo to make its wrapper, so without it there is none (and
        # importing it here would cost every caller a second)
        eval_frame = sys.modules.get("torch._dynamo.eval_frame")
        if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
            model = model._orig_mod
            continue
        return model


def as_directory(directory, op: str) -> Path:
    """``directory`` as a ``Path``; anything but a path (None, a number) is a TypeError naming it."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"{op}: directory must be a path (str or os.PathLike), got {type(directory).__name__}")
    return Path(directory)


def _is_writer() -> bool:
    """Rank 0 writes; every rank takes part in gathering sharded tensors."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _layer_table(model: nn.Module) -> list[list]:
    return [[n, m.kind, m.in_features, m.out_features] for n, m in adapted_layers(model)]


def _seeded(model: nn.Module, config: TiedLoRAConfig, name: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The value ``inject`` draws from the config's seed for the tied factor ``tiedlora.<group>.<A|B|
    core_bank>`` (on the CPU), or None for any other adapter tensor."""
    if not name.startswith(ROOT_ATTR + ".") or name.count(".") != 2:
        return None
    _, group, which = name.split(".")
    K = getattr(model, ROOT_ATTR)[group].A.shape[-1]  # (r, K), or (kA, r, K) with banks
    N = getattr(model, ROOT_ATTR)[group].B.shape[-2]
    return getattr(build_factors(config, group, K, N, "cpu", dtype), which).detach()


def _rebuildable(model: nn.Module, config: TiedLoRAConfig, name: str, prm: torch.Tensor) -> bool:
    """True when a frozen factor equals what ``inject`` rebuilds from the config's seed. Only fp32 and
    wider: the seed draws in fp32, so a 16-bit factor is a rounded draw, which a model loading it
    into wider adapters (allowed) would rebuild unrounded."""
    if prm.dtype.itemsize < 4:
        return False
    fresh = _seeded(model, config, name, prm.dtype)
    return fresh is not None and torch.equal(fresh, _full(prm))


def _check_layers_follow_config(model: nn.Module, config: TiedLoRAConfig) -> None:
    """Refuse to save a model whose layers' scaling or dropout differ from what its config rebuilds:
    the file holds the config, not these attributes, so it would load as another function."""
    for name, layer in adapted_layers(model):
        for what, have, want in (("scaling", layer.scaling, config.layer_scaling(name)),
                                 ("dropout", layer.dropout, config.dropout)):
            if have != want:
                raise ValueError(f"save_adapter: layer {name!r} has {what} {have!r} but the adapter config gives "
                                 f"{want!r} (set it through the config: alpha, alpha_pattern, rslora, gamma, "
                                 "dropout); the saved file would load as a different function")


def save_adapter(model: nn.Module, directory, optimizer: Optional[torch.optim.Optimizer] = None) -> Path:
    """Write the adapter of ``model`` (and optionally ``optimizer``'s state) to ``directory``.

    Only trained tensors are written, plus frozen ones the seed cannot rebuild. Each file is
    written to a temporary name, fsynced and renamed, so an interrupted save never leaves a
    half-written checkpoint behind. Under ``torch.distributed`` every rank must call it (FSDP2
    shards are gathered); rank 0 writes.

    A model wrapped by ``torch.compile`` or DDP is saved as the plain model inside. Trained parameters
    outside the adapters (an unfrozen task head) are not saved: a warning names them.

    Returns:
        The path of the adapter file.
    """
    model = unwrapped(model)
    directory = as_directory(directory, "save_adapter")
    config = adapter_config(model)
    _check_layers_follow_config(model, config)
    tensors = {}
    for name, prm in adapter_named_parameters(model):
        if prm.requires_grad or not _rebuildable(model, config, name, prm):
            tensors[name] = _full(prm)
    refuse_nonfinite(tensors, "save_adapter")
    # Gathered on every rank (the same collectives as rank 0) and checked before anything is written.
    optimizer_state = _optimizer_tensors(model, optimizer) if optimizer is not None else None
    if optimizer_state is not None:
        refuse_nonfinite(optimizer_state[0], "save_adapter", "optimizer state")
    directory.mkdir(parents=True, exist_ok=True)
    if not _is_writer():
        return directory / ADAPTER_FILE
    _warn_trained_outside_adapter(model)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "layers": json.dumps(_layer_table(model)),
    }
    # The hash covers the metadata too: a flipped bit in the config (a scale, a dropout) is refused.
    meta["sha256"] = content_hash(tensors, meta["format_version"], meta["config"], meta["layers"])
    path = directory / ADAPTER_FILE
    if file_format(path) not in (None, FORMAT):  # PEFT's export has the same file names
        raise ValueError(f"save_adapter: {directory} holds an {ADAPTER_FILE} that is no tiedlora checkpoint (a PEFT "
                         "export?), which the save would replace; save into another directory")
    if optimizer_state is not None:
        # Written first and stamped with the adapter's hash: a crash between the two renames leaves a
        # pair that load_adapter refuses instead of silently resuming with another save's moments.
        _save_optimizer(*optimizer_state, directory / OPTIMIZER_FILE, meta["sha256"])
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    human = {**config.to_dict(), "layers": _layer_table(model), "sha256": meta["sha256"]}
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(human, indent=2)))
    return path


def file_format(path: Path) -> Optional[str]:
    """The ``format`` a safetensors file's metadata names ("" for none: PEFT's files), or None when
    there is no readable file at ``path`` (a half-written one may be replaced)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", "")
    except (SafetensorError, OSError):
        return None


def _warn_trained_outside_adapter(model: nn.Module) -> None:
    """Warn about trained parameters that are no adapter tensor: the file does not hold them, so a
    reloaded adapter computes with whatever values the model it is loaded into has (not an error: a
    head trained on purpose may be saved separately)."""
    adapter = {id(prm) for _, prm in adapter_named_parameters(model)}
    others = [n for n, prm in model.named_parameters() if prm.requires_grad and id(prm) not in adapter]
    if others:
        more = f" and {len(others) - 3} more" if len(others) > 3 else ""
        warnings.warn(f"save_adapter: trained parameters outside the adapter are not saved: {others[:3]}{more}; "
                      "a model loading this adapter keeps its own values of them (save them separately, or "
                      "freeze them)", UserWarning, stacklevel=3)


def _peft_hint(directory: Path) -> str:
    """What to do with ``directory`` when its config is a PEFT adapter's (it names a ``peft_type``), or ""."""
    try:
        peft_config = "peft_type" in json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError, TypeError):
        peft_config = False
    return (" (a PEFT adapter directory, as export_peft writes: load it with peft.PeftModel.from_pretrained, then "
            "convert with tiedlora_kernels.from_peft)" if peft_config else "")


def _read_safetensors(path: Path, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; any read failure is a ValueError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return meta, load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load_adapter: {what} {path} is missing, corrupted or truncated ({e})") from None


def read_adapter(directory) -> tuple[TiedLoRAConfig, list, dict[str, torch.Tensor]]:
    """(config, layer table, tensors) of a saved adapter, verified against its content hash."""
    config, layers, tensors, _ = _read_verified(directory)
    return config, layers, tensors


def _read_verified(directory) -> tuple[TiedLoRAConfig, list, dict[str, torch.Tensor], str]:
    path = as_directory(directory, "load_adapter") / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"load_adapter: no {ADAPTER_FILE} in {directory}{_peft_hint(Path(directory))}")
    meta, tensors = _read_safetensors(path, "adapter")
    if meta.get("format") != FORMAT:
        raise ValueError(f"load_adapter: {path} is not a tiedlora adapter file (format={meta.get('format')!r})"
                         f"{_peft_hint(Path(directory))}")
    missing = [k for k in ("format_version", "config", "layers", "sha256") if k not in meta]
    if missing:
        raise ValueError(f"load_adapter: {path} lacks metadata {missing}: the file is corrupted")
    if meta["format_version"] not in READABLE_VERSIONS:
        raise ValueError(f"load_adapter: {path} has format_version {meta['format_version']!r}; this version of "
                         f"tiedlora-kernels reads {sorted(READABLE_VERSIONS)}")
    if content_hash(tensors, meta["format_version"], meta["config"], meta["layers"]) != meta["sha256"]:
        raise ValueError(f"load_adapter: {path} failed its content check (sha256 mismatch): the file is corrupted")
    try:
        fields = json.loads(meta["config"])
        if not isinstance(fields, dict):
            raise TypeError(f"the config is a {type(fields).__name__}, not a table")
        config = TiedLoRAConfig.from_dict({**READABLE_VERSIONS[meta["format_version"]], **fields})
        layers = json.loads(meta["layers"])
        if not isinstance(layers, list) or not all(
                isinstance(row, list) and len(row) == 4 and all(isinstance(v, str) for v in row[:2])
                and all(isinstance(v, int) and not isinstance(v, bool) for v in row[2:]) for row in layers):
            raise TypeError("the layer table is not a list of [name, kind, in_features, out_features]")
    except (ValueError, TypeError) as e:
        raise ValueError(f"load_adapter: {path} has an unreadable config ({e})") from None
    return config, layers, tensors, meta["sha256"]


def _table(targets) -> list:
    """The layer table (name, kind, K, N per layer) of ``find_targets``' targets."""
    return [[t.name, t.kind, t.in_features, t.out_features] for t in targets]


def _targets_or_refuse(model: nn.Module, config: TiedLoRAConfig):
    try:
        return find_targets(model, config)
    except ValueError as e:
        raise ValueError(f"load_adapter: the saved adapter does not fit this model ({e})") from None


def _check_layers(mine: list, saved: list) -> None:
    """Refuse, naming the first difference, unless the model adapts exactly the saved layers."""
    if mine == saved:
        return
    have = {row[0]: row for row in mine}
    for row in saved:
        if have.get(row[0]) != row:
            hint = ""
            if row[0] in have and have[row[0]][2:] == row[2:]:
                hint = ("; only the kind differs: inject the model with the file's kind_rule and kinds "
                        "(format-1 files name kinds by the last path component, kind_rule='last'), or load "
                        "into a model without adapters")
            raise ValueError(f"load_adapter: saved layer {row[0]!r} (kind, K, N = {row[1:]}) does not match "
                             f"the model ({have.get(row[0], ['missing'])[1:] or 'missing'}){hint}")
    raise ValueError(f"load_adapter: the model adapts layers the file does not have: "
                     f"{sorted(set(have) - {r[0] for r in saved})}")


def load_adapter(model: nn.Module, directory, optimizer: Optional[torch.optim.Optimizer] = None) -> nn.Module:
    """Load a saved adapter into ``model``, injecting it first if the model has none.

    Verifies the config, the adapted layers (names and shapes), and each tensor's name, shape and
    dtype, raising a ``ValueError`` that names the first mismatch; nothing is copied until all
    checks pass. With ``optimizer``, also restores its state from ``optimizer.safetensors``: afterwards
    the optimizer holds exactly the file's state. A model wrapped by ``torch.compile`` or DDP loads into
    the plain model inside (DDP: only one that has its adapters already); tensors on the meta device
    are refused.
    """
    wrapped, model = model, unwrapped(model)
    if not hasattr(model, ROOT_ATTR) and any(isinstance(m, nn.parallel.DistributedDataParallel)
                                             for m in wrapped.modules()):
        raise ValueError("load_adapter: the model is wrapped in DistributedDataParallel and has no adapters: DDP "
                         "would not synchronise the parameters inject adds; load the adapter into the plain model, "
                         "then wrap it")
    config, layers, tensors, sha256 = _read_verified(directory)
    refuse_nonfinite(tensors, "load_adapter")
    if not hasattr(model, ROOT_ATTR):
        if optimizer is not None:
            raise ValueError("load_adapter: optimizer= needs a model that has its adapters already (inject, build the "
                             "optimizer over its parameters, then load); this one has none")
        # Every check before injecting, so a refused file leaves the model untouched: the layers, then the
        # tensors against what inject would make, worked out on a shell of the model on the meta device
        # (nothing allocated: a config whose trained banks are larger than the file's tensors is refused
        # here), then their dtypes.
        targets = _targets_or_refuse(model, config)
        if config.exclude_rule == "name" and _table(targets) != layers:
            # format-2 files were also written, for a few commits, under the module rule: the layer
            # table says which rule selected the saved layers
            other = dataclasses.replace(config, exclude_rule="module")
            try:
                other_targets = find_targets(model, other)
            except ValueError:
                other_targets = None
            if other_targets is not None and _table(other_targets) == layers:
                config, targets = other, other_targets
        _check_layers(_table(targets), layers)
        with warnings.catch_warnings():  # the shell's inject: its warnings are the model's, given just below
            warnings.simplefilter("ignore")
            shell = inject(linear_shell(model, meta=True), config)
        _check_tensors(tensors, dict(adapter_named_parameters(shell)))
        _check_dtypes(tensors, adapter_dtypes(model, config, targets))
        _refuse_meta(model, [t.name for t in targets])
        inject(model, config)
    else:
        refuse_merged(model, "load_adapter")
        _refuse_meta(model, [name for name, _ in adapted_layers(model)])
        # How layers were selected (target_modules, exclude_modules and their rule) and kinds named does
        # not matter, only which they are: _check_layers compares them per layer, with their kinds; nor
        # the adapter dtype the file was made with: _check_dtypes takes each tensor into one of its
        # dtype or wider.
        have = adapter_config(model).to_dict()
        diff = {k: (have[k], v) for k, v in config.to_dict().items()
                if have.get(k) != v and k not in ("target_modules", "exclude_modules", "exclude_rule", "kind_rule",
                                                  "kinds", "adapter_dtype")}
        if diff:
            raise ValueError(f"load_adapter: the model's adapter config differs from the saved one "
                             f"(field: (model, file)): {diff}")
    _check_layers(_layer_table(model), layers)
    params = dict(adapter_named_parameters(model))
    _check_dtypes(tensors, {n: prm.dtype for n, prm in params.items()})
    _check_tensors(tensors, params)
    # The optimizer's file is read and checked whole before anything of the model changes.
    restore_optimizer = _read_optimizer(model, optimizer, Path(directory) / OPTIMIZER_FILE, sha256) \
        if optimizer is not None else None
    # A frozen factor the file leaves out is the one its seed rebuilds (save_adapter's rule): set it
    # from the seed, since a model that already had adapters may hold another adapter's.
    rebuilt = {name: _seeded(model, config, name, prm.dtype) for name, prm in params.items() if name not in tensors}
    rebuilt = {name: t for name, t in rebuilt.items() if t is not None}
    with torch.no_grad():
        for name, t in {**tensors, **rebuilt}.items():
            prm = params[name]
            prm.copy_(_placed_like(t, prm))
    if restore_optimizer is not None:
        restore_optimizer()
    return wrapped


def _placed_like(t: torch.Tensor, prm: torch.Tensor) -> torch.Tensor:
    """``t``, a whole tensor of ``prm``'s shape, placed as ``prm`` is: on its device, or, for an FSDP2 shard
    (a DTensor), distributed with its mesh and placements, so that this rank keeps its own part
    (a collective: every rank loads, in the same order)."""
    if hasattr(prm, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(prm.device_mesh.device_type), prm.device_mesh, prm.placements)
    return t.to(prm.device)


def _refuse_meta(model: nn.Module, layer_names: list[str]) -> None:
    """Refuse a model whose adapted (or to be adapted) layers or shared factors are on the meta device:
    copying into a meta tensor does nothing, so the load would succeed and load nothing."""
    modules = [(name, model.get_submodule(name)) for name in layer_names]
    if hasattr(model, ROOT_ATTR):
        modules.append((ROOT_ATTR, getattr(model, ROOT_ATTR)))
    for name, module in modules:
        for pname, t in module.named_parameters():
            if t.is_meta:
                raise ValueError(f"load_adapter: {name}.{pname} is on the meta device; materialise the model first "
                                 "(model.to_empty(device=...)), load its base weights, then load the adapter")


def _check_tensors(tensors: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
    """Refuse a file whose tensors are not the adapter ``params`` would hold: a name the model has
    no tensor for, another shape, or a trained tensor left out."""
    for name, t in tensors.items():
        prm = params.get(name)
        if prm is None:
            raise ValueError(f"load_adapter: tensor {name!r} in the file has no counterpart in the model")
        if tuple(prm.shape) != tuple(t.shape):
            raise ValueError(f"load_adapter: tensor {name!r} has shape {tuple(t.shape)} in the file, "
                             f"{tuple(prm.shape)} in the model")
    missing = [n for n, prm in params.items() if prm.requires_grad and n not in tensors]
    if missing:
        raise ValueError(f"load_adapter: trained tensors missing from the file: {missing}")


def _check_dtypes(tensors: dict[str, torch.Tensor], want: dict[str, torch.dtype]) -> None:
    """Refuse a file tensor that the model's dtype ``want`` (by tensor name, or by the name of the
    layer or factor group that holds it) cannot hold exactly. A wider model dtype is fine (a bf16
    file into fp32 adapters: a model cast to bf16 after ``inject`` saves bf16 tensors, and a fresh
    model injected from the same config holds fp32 ones); a narrower one would round, silently."""
    for name, t in tensors.items():
        dtype = want.get(name, want.get(name.rpartition(".")[0]))
        if dtype is not None and torch.promote_types(t.dtype, dtype) != dtype:
            raise ValueError(f"load_adapter: tensor {name!r} has dtype {t.dtype} in the file, {dtype} in the model, "
                             "which would round it; load into adapters of the file's dtype or wider")


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """(state tensors keyed ``<param name>/<state key>``, param groups with parameters by name)."""
    names = _param_names(model)
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in names]
    if foreign:
        shapes = [tuple(p.shape) for p in foreign[:3]]
        raise ValueError(f"save_adapter: {len(foreign)} of the optimizer's parameters are not parameters of the model "
                         f"(shapes {shapes}{' ...' if len(foreign) > 3 else ''}); pass the optimizer built over this "
                         "model's parameters")
    tensors = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, val in optimizer.state.get(p, {}).items():
                tensors[f"{names[id(p)]}/{key}"] = _full(val) if torch.is_tensor(val) else torch.tensor(val)
    groups = [{k: _plain(v) for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return _unshared(tensors), groups


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors``, each one whose memory an earlier one already uses cloned: safetensors refuses to
    write shared memory, and optimizers share state between parameters (bitsandbytes' 8-bit ones give
    every parameter the same quantization maps, ``qmap1`` and ``qmap2``)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def _plain(value):
    """A hyperparameter as JSON holds it: tensors (``lr=torch.tensor(...)``) as numbers or lists."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _fits(saved, have) -> bool:
    """Whether a saved hyperparameter can stand where the optimizer has ``have`` (same kind of value;
    numbers finite)."""
    if have is None or saved is None:
        return True
    if isinstance(have, torch.Tensor):
        return _fits(saved, _plain(have))
    if isinstance(have, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(have) and all(map(_fits, saved, have))
    if isinstance(have, bool) or isinstance(saved, bool):
        return isinstance(have, bool) and isinstance(saved, bool)
    if isinstance(have, (int, float)):
        return isinstance(saved, (int, float)) and math.isfinite(saved)
    return type(saved) is type(have)


def _like(saved, have):
    """A saved hyperparameter in the optimizer's form (tuples, tensors on their device)."""
    if isinstance(have, torch.Tensor):
        return torch.tensor(saved, dtype=have.dtype, device=have.device)
    if isinstance(have, (list, tuple)):
        return type(have)(_like(v, h) for v, h in zip(saved, have))
    return saved


def _save_optimizer(tensors: dict[str, torch.Tensor], groups: list, path: Path, adapter_sha256: str) -> None:
    """Optimizer state (:func:`_optimizer_tensors`) as safetensors: tensors keyed ``<param name>/<state key>``,
    groups in metadata."""
    meta = {"param_groups": json.dumps(groups, default=str), "adapter_sha256": adapter_sha256}  # str: a last resort
    meta["sha256"] = content_hash(tensors, meta["param_groups"], adapter_sha256)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


#: Optimizer state entries that have their parameter's shape and dtype (torch's Adam, AdamW, SGD, ...).
_PARAM_SHAPED_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "acc_delta",
                       "sum", "ax", "prev")


def _check_param_groups(mine: list, saved: list) -> None:
    """Refuse, naming the first difference, unless the optimizer's groups hold the saved parameter names
    in the saved order (moments are matched to parameters by position, as torch's load_state_dict does)."""
    if mine == saved:
        return
    where = (f"it has {len(mine)} parameter groups, the saved optimizer {len(saved)}" if len(mine) != len(saved)
             else next(f"group {i} holds {len(m)} parameters {_first(m)}, the saved one {len(s)} {_first(s)}"
                       for i, (m, s) in enumerate(zip(mine, saved)) if m != s))
    raise ValueError(f"load_adapter: the optimizer's parameters differ from the saved optimizer's ({where}); "
                     "build its parameter groups as they were saved (same groups, same order)")


def _first(names: list, n: int = 3) -> str:
    shown = ", ".join(repr(x) if x is not None else "<not an adapter parameter>" for x in names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}]"


def _read_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, adapter_sha256: str):
    """Read and check ``optimizer.safetensors`` whole (hash, the adapter it belongs to, its parameter
    groups, every state tensor's parameter, shape, dtype and values, every hyperparameter's type),
    changing nothing; returns the function that then restores it."""
    meta, tensors = _read_safetensors(path, "optimizer state")
    if "param_groups" not in meta or content_hash(tensors, meta["param_groups"], meta.get("adapter_sha256", "")) \
            != meta.get("sha256"):
        raise ValueError(f"load_adapter: {path} failed its content check (sha256 mismatch)")
    if meta.get("adapter_sha256") != adapter_sha256:
        raise ValueError(f"load_adapter: the optimizer state in {path} belongs to another save of the adapter "
                         "(its adapter_sha256 differs): refusing to resume with mismatched moments")
    names = _param_names(model)
    try:
        saved_groups = json.loads(meta["param_groups"])
    except ValueError:
        saved_groups = None
    if not isinstance(saved_groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                                     for g in saved_groups):
        raise ValueError(f"load_adapter: {path} has unreadable parameter groups")
    _check_param_groups([[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups],
                        [sg["params"] for sg in saved_groups])
    for g, sg in zip(optimizer.param_groups, saved_groups):
        for k, v in sg.items():
            if k != "params" and k in g and not _fits(v, g[k]):
                raise ValueError(f"load_adapter: {path}: hyperparameter {k!r} = {v!r} does not fit the optimizer's "
                                 f"({g[k]!r})")
    by_name = {names[id(p)]: p for g in optimizer.param_groups for p in g["params"]}
    for key, t in tensors.items():
        pname, _, skey = key.rpartition("/")
        p = by_name.get(pname)
        if p is None:
            raise ValueError(f"load_adapter: {path}: state {key!r} names no parameter of the optimizer")
        # (a moment saved for a bf16 adapter widens exactly into an fp32 one, as the adapter itself does)
        if skey in _PARAM_SHAPED_STATE and (tuple(t.shape) != tuple(p.shape)
                                            or torch.promote_types(t.dtype, p.dtype) != p.dtype):
            raise ValueError(f"load_adapter: {path}: state {key!r} is {tuple(t.shape)} {t.dtype}, its parameter "
                             f"{tuple(p.shape)} {p.dtype}")
    refuse_nonfinite(tensors, f"load_adapter: {path}", "state")

    def restore() -> None:
        for g, sg in zip(optimizer.param_groups, saved_groups):
            # Hyperparameters (lr, betas, weight decay, ...) come back too; JSON turned tuples into lists.
            for k, v in sg.items():
                if k != "params" and k in g:
                    g[k] = _like(v, g[k])
        for g in optimizer.param_groups:
            step_on_device = bool(g.get("fused") or g.get("capturable"))
            for p in g["params"]:
                prefix = names[id(p)] + "/"
                state = {k[len(prefix):]: _restored_state(k[len(prefix):], t, p, step_on_device)
                         for k, t in tensors.items() if k.startswith(prefix)}
                if state:
                    optimizer.state[p] = state
                else:  # no state at save time: moments the optimizer gathered since would be stale
                    optimizer.state.pop(p, None)

    return restore


def _restored_state(key: str, t: torch.Tensor, p: torch.Tensor, step_on_device: bool) -> torch.Tensor:
    """A saved optimizer state tensor as the optimizer keeps it for its parameter ``p``. Adam keeps
    ``step`` on the CPU, a plain tensor also under FSDP2, and a fused or capturable one as fp32 on the
    parameter's device (``step_on_device``, as torch's own ``load_state_dict`` puts it). A state tensor of
    the parameter's shape (moments, momentum; in its dtype) is placed as the parameter is: under FSDP2 a DTensor
    sharded like it (the step would otherwise mix a whole tensor with the parameter's shard);
    anything else lives on the parameter's device."""
    if key == "step":
        return t.to(p.device, torch.float32) if step_on_device else t
    if key in _PARAM_SHAPED_STATE:
        t = t.to(p.dtype)  # (checked: the same dtype or a narrower one, widened exactly)
    if tuple(t.shape) == tuple(p.shape):
        return _placed_like(t, p)
    return t.to(p.device)
