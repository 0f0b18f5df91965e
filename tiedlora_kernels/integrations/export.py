"""Export an adapter as a standard PEFT LoRA directory, the format vLLM, SGLang, TGI, LoRAX and PEFT load.

Every adapter of the family whose update is low-rank is, layer by layer, an ordinary LoRA:

    dW_i = s_i * diag(v_i) B_i diag(u_i) A_i  =  lora_B_i @ lora_A_i
    lora_A_i = diag(u_i) A_i                 (r, K)
    lora_B_i = s_i * diag(v_i) B_i           (N, r)

with layer i's *effective* tensors (:meth:`TiedLoRALinear.adapter_tensors`), so tied factors,
VeRA, partial tying (A_i = sum_k wA_i[k] LA[k]), Tied-LoRA Extra (B_i = B M_i) and tensor
embedding reduce exactly. DoRA's magnitude m is PEFT DoRA's ``lora_magnitude_vector``.

Scaling: s_i is folded into lora_B_i and every module gets lora_alpha = its rank, so PEFT's
scaling alpha / r is 1 everywhere. The alternative, lora_alpha = s * r with ``alpha_pattern``
entries where s differs, is exact in PEFT but not in serving engines: vLLM reads one
lora_alpha / r for the whole adapter and ignores ``alpha_pattern`` and ``rank_pattern``. With
scaling 1 per module the file means the same thing to every reader, and per-layer s (e.g. from
``from_peft`` or gamma) needs no pattern at all.

Size: the export stores one (A_i, B_i) pair per layer, the tensors of a LoRA of the same rank and
targets whatever the preset, so a tied adapter becomes up to L times larger than its own tensors
(L = layers per kind; TL5 exactly L times). Tying is what we store; LoRA is what engines read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..modules import TiedLoRALinear
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import _is_writer, as_directory, file_format, fsync_dir, unwrapped, usual_mode
from .inject import (ROOT_ATTR, adapted_layers, adapter_config, adapter_named_parameters, embedding_pair,
                     refuse_nonfinite, refuse_sharded)

#: PEFT's file names (fixed by PEFT, whatever our own checkpoints are called).
ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
#: PEFT's prefix of every key: ``PeftModel.base_model`` (LoraModel) ``.model`` (the base model).
PEFT_PREFIX = "base_model.model."


def export_peft(model: nn.Module, directory, *, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``model``'s adapter as a PEFT LoRA (or DoRA) directory: ``adapter_config.json`` and
    ``adapter_model.safetensors``, loadable by ``peft.PeftModel.from_pretrained`` and by serving
    engines (``vllm serve BASE --enable-lora --lora-modules name=DIR``).

    Per adapted layer i, with its effective tensors A_i (r, K), B_i (N, r), u_i (r,), v_i (N,) and
    scaling s_i: ``lora_A = diag(u_i) A_i``, ``lora_B = s_i diag(v_i) B_i``, and lora_alpha = r, so
    PEFT's scaling is 1 (see the module docstring for why). Keys and ``target_modules`` are what
    ``peft.get_peft_model`` gives on the same base model: ``base_model.model.<module path>.lora_A.weight``;
    each target is the shortest module-name suffix that selects adapted layers only, so PEFT adapts
    exactly the layers we adapted. Kinds of different rank get ``rank_pattern`` / ``alpha_pattern``
    entries (alpha = rank). ``Conv1D`` layers (GPT-2) set ``fan_in_fan_out``; adapter dropout is
    recorded as ``lora_dropout`` (it acts in training only). Tensors are written in float32 (the
    folded products are not representable in bf16 without rounding; engines cast on load).

    DoRA exports as PEFT DoRA (``use_dora=True``, ``lora_magnitude_vector = m``): the same outputs in
    eval mode (PEFT, unlike us, applies DoRA's base term to the dropped-out input while training with
    dropout > 0). vLLM does not load DoRA.

    Trained parameters outside the adapter (an unfrozen task head, a trained norm) go in as PEFT's
    ``modules_to_save``: each parameter's module by its full path, with its trained tensors in
    their dtype, so ``PeftModel.from_pretrained`` computes what the model does (serving engines
    that ignore ``modules_to_save``, vLLM among them, serve the base model's head). A trained input
    embedding tied to the output head goes in with ``ensure_weight_tying``, as PEFT saves it. Refused
    when PEFT cannot hold one so: a parameter of an adapted layer itself (its base weight or bias),
    of a module that holds adapted layers (or whose name ends another module's that does), of the
    model's root, or shared otherwise (PEFT's copy would untie it).

    A merged model (:func:`merge`) exports as it is, untouched: merging changes the base weights,
    never the adapter tensors, and the export is an adapter for the *original* base model.

    The directory is written atomically: both files go into a temporary sibling directory that is
    fsynced and renamed into place (an existing ``directory`` may be empty or hold a previous
    export, and is replaced as a whole), so a crash never leaves a config of one export beside
    the weights of another. A directory holding a :func:`save_adapter` checkpoint (the same file
    names) is refused, not replaced.

    Size: one (lora_A, lora_B) pair per layer, as large as a LoRA of that rank and targets, so a tied
    adapter grows up to L times its own tensors (L = layers per kind; our saved file keeps frozen
    factors as a seed, so TL1..TL4 and VeRA grow more against it). LLaMA-2-7B, all linear layers,
    r = 8, fp32: TL5 2.5 MB, TL6 7.9 MB, the export 80 MB.

    Args:
        model: a model prepared by :func:`inject` (or :func:`from_peft` / :func:`load_adapter`),
            on any device, merged or not, not sharded (FSDP2: gather the full model first). A model
            wrapped by ``torch.compile`` or DDP exports the plain model inside.
            Under ``torch.distributed`` (DDP), rank 0 writes and the other ranks return at once.
        directory: the output directory (created, parents included).
        base_model_name_or_path: recorded in the config for ``AutoPeftModel`` and engines; default
            ``model.config._name_or_path`` (or ``model.name_or_path``) when set.

    Returns:
        The directory's path.

    Raises:
        ValueError: for an adapter tensor holding NaN or inf (naming it); for adapters with no exact PEFT LoRA form (Simple DoRA; layers that mix DoRA
            and plain LoRA, or differ in dropout; a trained parameter outside the adapter that
            ``modules_to_save`` cannot hold), naming why; for a sharded model; or for an existing
            ``directory`` holding other files or a tiedlora checkpoint.
    """
    model = unwrapped(model)
    directory = as_directory(directory, "export_peft")
    adapter_config(model)  # raises if the model has no adapters
    layers = list(adapted_layers(model))
    _refuse_inexact(layers)
    dora = layers[0][1].magnitude == "dora"
    tensors, ranks = {}, {}
    with torch.no_grad():
        for name, layer in layers:
            lora_A, lora_B = peft_factors(layer)
            ranks[name] = lora_A.shape[0]
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = lora_A
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = lora_B
            if dora:
                tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = _cpu_fp32(layer.adapter_m)
    head_tensors, modules_to_save, task_type, tie = _modules_to_save(model, layers, _task_type(model))
    tensors.update(head_tensors)
    refuse_nonfinite(tensors, "export_peft")  # a diverged adapter: PEFT and engines would serve NaN
    all_modules = [n for n, _ in model.named_modules() if n and n != ROOT_ATTR and not n.startswith(ROOT_ATTR + ".")]
    adapted = [n for n, _ in layers]
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {}
    for rank in sorted(set(ranks.values()) - {r}):
        group = [n for n in adapted if ranks[n] == rank]
        for suffix in _selecting_suffixes(group, adapted):
            rank_pattern[re.escape(suffix)] = rank
    if base_model_name_or_path is None:
        cfg = getattr(model, "config", None)
        base_model_name_or_path = (getattr(cfg, "_name_or_path", None) or getattr(model, "name_or_path", None)
                                   or None)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "target_modules": _selecting_suffixes(adapted, all_modules),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "lora_dropout": layers[0][1].dropout,
        "fan_in_fan_out": any(layer.layout == "conv1d" for _, layer in layers),
        "bias": "none",
        "use_rslora": False,
        "use_dora": dora,
        "modules_to_save": modules_to_save or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        **({"ensure_weight_tying": True} if tie else {}),
    }
    if not _is_writer():
        return directory
    _write_directory(directory, {
        ADAPTER_FILE: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
        CONFIG_FILE: lambda path: Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"),
    })
    return directory


def peft_factors(layer: TiedLoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_A (r, K), lora_B (N, r)) of one layer, float32 on the CPU, with lora_B @ lora_A =
    s * diag(v_i) B_i diag(u_i) A_i (products formed in float64, rounded once)."""
    A, B, u, v = (None if t is None else _full(t).double() for t in layer.adapter_tensors())
    lora_A = A if u is None else u[:, None] * A
    lora_B = layer.scaling * (B if v is None else v[:, None] * B)
    return lora_A.float().contiguous(), lora_B.float().contiguous()


def _refuse_inexact(layers: list[tuple[str, TiedLoRALinear]]) -> None:
    """Raise for anything PEFT LoRA / DoRA would load with different outputs, before anything is written."""
    refuse_sharded(layers, "export_peft", "export from one process with the full model (e.g. save_adapter, then "
                   "load_adapter into an unsharded copy)")
    for name, layer in layers:
        for t in (*layer.factors.parameters(), *(getattr(layer, n) for n in TiedLoRALinear.PER_LAYER)):
            if t is not None and t.is_meta:
                raise ValueError(f"export_peft: layer {name!r} has adapter tensors on the meta device; "
                                 "materialise and load them first")
        if layer.magnitude == "simple_dora":
            raise ValueError(f"export_peft: layer {name!r} uses Simple DoRA, which has no PEFT LoRA form: its "
                             "magnitude rescales the frozen base output by m / ||W||_row, which no update "
                             "W + B A can express, and PEFT's DoRA divides by ||W + dW||_row and so computes "
                             f"a different function. {_merge_advice(layers)}")
        if layer.magnitude not in ("none", "dora"):
            raise ValueError(f"export_peft: layer {name!r} has magnitude={layer.magnitude!r}, which has no PEFT "
                             f"form. {_merge_advice(layers)}")
    first_name, first = layers[0]
    for name, layer in layers[1:]:
        if (layer.magnitude == "dora") != (first.magnitude == "dora"):
            raise ValueError(f"export_peft: layers {first_name!r} and {name!r} differ in DoRA, but PEFT's use_dora "
                             f"is one flag per adapter. {_merge_advice(layers)}")
        if layer.dropout != first.dropout:
            raise ValueError(f"export_peft: layers {first_name!r} and {name!r} have different adapter dropout "
                             f"({first.dropout} vs {layer.dropout}), but PEFT's lora_dropout is one value per adapter")


def _merge_advice(layers: list[tuple[str, TiedLoRALinear]]) -> str:
    """How to serve an adapter that has no PEFT form: merged into the base weights. Over a quantized base, into
    a dense copy: merged into quantized layers the weights are rounded, and the model's ``save_pretrained``
    checkpoint (base weights under ``base_layer.``) does not load back. ``dequantize()`` keeps the weights
    the adapter was trained over, so the merged copy computes what the adapted model does."""
    if any(layer.layout == "quantized" for _, layer in layers):
        return ("Serve it merged into a dense copy of the model (the base is quantized: merged into it, the weights "
                "are rounded and the saved model does not load back): save_adapter(model, dir); load the quantized "
                "base again and dequantize it (transformers: dense = base.dequantize()); load_adapter(dense, dir); "
                "tiedlora_kernels.merge(dense); then dense.save_pretrained(...).")
    return "Serve it merged instead: tiedlora_kernels.merge(model), then save the full model (model.save_pretrained)."


def _selecting_suffixes(chosen: list[str], universe: list[str]) -> list[str]:
    """The shortest dotted suffix of each name in ``chosen`` that matches no name of ``universe``
    outside ``chosen``, by PEFT's rule for ``target_modules`` lists (the name equals the suffix or
    ends with ``"." + suffix``), deduplicated in first-seen order. Every-layer kinds give their
    last component (``q_proj``); GPT-2 adapting only ``attn.c_proj`` gives ``attn.c_proj``."""
    chosen_set = set(chosen)
    others = [n for n in universe if n not in chosen_set]
    out: list[str] = []
    for name in chosen:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(n == suffix or n.endswith("." + suffix) for n in others):
                break
        if suffix not in out:
            out.append(suffix)
    return out


#: PEFT's ``task_type`` of a model class, by the transformers auto-class mapping that loads that class:
#: ``AutoPeftModelFor<task>`` loads the base with that auto class and accepts the directory only with it.
_TASK_TYPES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
)


def _task_type(model: nn.Module) -> Optional[str]:
    """PEFT's ``task_type`` for a model class that a transformers auto class of a PEFT task loads (a
    causal or sequence-to-sequence LM, a sequence or token classifier, extractive QA), so that
    ``AutoPeftModelFor<task>`` accepts the directory; ``CAUSAL_LM`` for any other ``...ForCausalLM`` /
    ``...LMHeadModel``; None otherwise (a plain ``PeftModel``). The classifier and QA task types make
    PEFT copy the head (``classifier`` / ``score`` / ``qa_outputs``) as a module to save: the base's
    own head where the file holds none, the same function."""
    name = type(model).__name__
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # no transformers: no auto classes to match
        modeling_auto = None
    for mapping, task in _TASK_TYPES:
        classes = getattr(modeling_auto, mapping, {}).values() if modeling_auto is not None else ()
        if any(name == c or (isinstance(c, (tuple, list)) and name in c) for c in classes):
            return task
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


#: The modules PEFT adds to ``modules_to_save`` itself for a task type (its PeftModelFor<task> classes).
_PEFT_TASK_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                      "QUESTION_ANS": ("qa_outputs",)}


def _modules_to_save(model: nn.Module, layers: list[tuple[str, TiedLoRALinear]], task: Optional[str]
                     ) -> tuple[dict[str, torch.Tensor], list[str], Optional[str], bool]:
    """({PEFT key: tensor}, ``modules_to_save``, ``task_type``, ``ensure_weight_tying``) for the trained
    parameters outside the adapter. PEFT copies every module whose path ends with a listed name, or
    with one its task type adds (:data:`_PEFT_TASK_MODULES`), and loads each copy's whole state from
    the file (keys ``base_model.model.<module path>.<state key>``): the file holds every such module's
    state as the model has it. A trained embedding tied to the output head is listed as the input
    embedding with ``ensure_weight_tying`` (PEFT keeps the two copies one tensor), both modules'
    states in the file, as PEFT saves it. Raises for a trained parameter PEFT would load as another
    function; a task type whose head would copy an adapted layer is dropped (a plain ``PeftModel``
    loads the directory)."""
    adapted = [n for n, _ in layers]
    adapter = {id(prm) for _, prm in adapter_named_parameters(model)}
    names_of: dict[int, list[str]] = {}
    for pname, prm in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(prm), []).append(pname)
    module_names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    tied = _tied_embeddings(model)
    tie = False

    def copied(targets) -> list[str]:  # PEFT's rule: the module's path ends with a target
        return [n for n in module_names if any(n.endswith(t) for t in targets)]

    def adapted_in(n: str) -> Optional[str]:  # an adapted layer that is n, holds n or is held by n
        return next((a for a in adapted if a == n or a.startswith(n + ".") or n.startswith(a + ".")), None)

    owners: list[str] = []
    for pname, prm in model.named_parameters():
        if not prm.requires_grad or id(prm) in adapter:
            continue
        owner = pname.rpartition(".")[0]
        why = None
        tied_pair = tied is not None and set(names_of[id(prm)]) == {f"{m}.weight" for m in tied}
        if tied_pair:  # the input embedding, its output twin kept tied (ensure_weight_tying)
            owner, tie = tied[0], True
        if len(names_of[id(prm)]) > 1 and not tied_pair:
            why = (f"is shared with {names_of[id(prm)][1]!r} (tied weights, not the model's input and output "
                   "embeddings), which PEFT's module copy would untie")
        elif not owner:
            why = "belongs to the model's root, which PEFT cannot copy as a module"
        elif adapted_in(owner) is not None and not any(a.startswith(owner + ".") for a in adapted):
            why = (f"belongs to the adapted layer {adapted_in(owner)!r} itself (its base weight or bias), which a "
                   "PEFT LoRA file does not hold")
        else:
            clash = next(((n, adapted_in(n)) for n in copied([owner]) if adapted_in(n)), None)
            if clash is not None:
                why = (f"belongs to {owner!r}, and PEFT's copy of {clash[0]!r} as a module to save (PEFT copies "
                       f"every module whose name ends with {owner!r}) would hold the adapted layer {clash[1]!r}; "
                       f"inject without adapting {clash[1]!r} (exclude_modules) to export the head")
        if why is not None:
            raise ValueError(f"export_peft: the trained parameter {pname!r} {why}; freeze it before exporting. "
                             f"{_merge_advice(layers)}")
        if owner not in owners:
            owners.append(owner)
    auto = _PEFT_TASK_MODULES.get(task, ())
    if any(adapted_in(n) for n in copied(auto)):  # an adapted head: not PEFT's task layout
        task, auto = None, ()
    # One copy per module: a module inside another copied one (RoBERTa's classifier.dense inside the
    # classifier SEQ_CLS copies) goes with it (PEFT's copies of both fail to load).
    listed = list(dict.fromkeys([*[t for t in auto if copied([t])], *owners]))
    candidates = copied(listed)
    outer = [n for n in candidates if not any(n.startswith(c + ".") for c in candidates)]
    listed = [t for t in listed if any(n.endswith(t) for n in outer)]
    if tie and tied[1] not in outer:
        outer.append(tied[1])
    # (copies: safetensors writes no two keys of one storage, which tied modules' states are)
    tensors = {f"{PEFT_PREFIX}{n}.{k}": _full(t).clone(memory_format=torch.contiguous_format)
               for n in outer for k, t in model.get_submodule(n).state_dict().items()}
    return tensors, listed, task, tie


def _tied_embeddings(model: nn.Module) -> Optional[tuple[str, str]]:
    """(input embedding path, output head path) of a model whose two share one weight, else None."""
    pair = embedding_pair(model)
    if pair is None or pair[0].weight is not pair[1].weight:
        return None
    paths = {id(m): n for n, m in model.named_modules()}
    return (paths[id(pair[0])], paths[id(pair[1])]) if all(id(m) in paths for m in pair) else None


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    return _full(t).float().contiguous()


def _write_directory(directory: Path, writers: dict) -> None:
    """Write ``{file name: write(path)}`` as one directory, all or nothing.

    The files go into a temporary sibling directory, each fsynced, then the directory is renamed
    into place. An existing ``directory`` (empty, or holding only a previous export) is first
    renamed aside and deleted after the swap: a crash between the two renames leaves no
    ``directory`` at all (a loader fails loudly), never a mix of two exports."""
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        if not directory.is_dir():
            raise ValueError(f"export_peft: {directory} exists and is not a directory")
        foreign = sorted(set(os.listdir(directory)) - set(writers))
        if foreign:
            raise ValueError(f"export_peft: {directory} holds other files {foreign}; export into a new or empty "
                             "directory (or one holding only a previous export, which is replaced)")
        if file_format(directory / ADAPTER_FILE) == CHECKPOINT_FORMAT:
            raise ValueError(f"export_peft: {directory} holds a tiedlora checkpoint (save_adapter writes "
                             f"{ADAPTER_FILE} too), which the export would replace; export into another directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        os.chmod(tmp, usual_mode(0o777))  # mkdtemp makes 0700; an export gets the usual modes
        for file_name, write in writers.items():
            path = tmp / file_name
            write(str(path))
            os.chmod(path, usual_mode(0o666))  # safetensors writes 0600
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=parent))
            os.replace(directory, old)  # onto the empty placeholder: directory -> old
        os.rename(tmp, directory)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not directory.exists():
            os.replace(old, directory)
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


