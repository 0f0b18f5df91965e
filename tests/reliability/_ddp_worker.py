"""One rank of the distributed-training checks, and the single-process recipe they are compared with.

Run as ``python _ddp_worker.py OUT_DIR CASES_JSON`` with ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT`` set (gloo, CPU). One process group serves every case in ``CASES_JSON`` (a
list of ``{"name", "preset", "ckpt", "wrap"[, "static_graph", "quantized", "optimizer", "resume_after"]}``:
``wrap`` is ``"ddp"`` or ``"fsdp2"``, ``ckpt`` is false, true (transformers' default non-reentrant activation
checkpointing) or ``"reentrant"``, ``optimizer`` is ``"sgd"`` (the default) or ``"adamw"``; an FSDP2 case with
``"resume_after": k`` saves the adapter and optimizer after step k, loads both into a fresh sharded model and
optimizer and trains the remaining steps there; a case with ``"expect_error": true`` records the
``RuntimeError`` it raises): startup
(imports, rendezvous) costs more than the training itself. Each rank trains on its contiguous
slice of the same global batch; after the last step rank 0 writes ``OUT_DIR/<name>.pt`` with the
full (gathered) value of every trainable parameter and a few facts about the wrapper.

The test imports :func:`build_model`, :func:`global_batch`, :func:`make_optimizer` and
:func:`train_single` from this file, so both sides run literally the same recipe.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import load_quantized, tiny_llama  # noqa: E402

from tiedlora_kernels import (TiedLoRAConfig, adapted_layers, export_peft, inject, load_adapter, merge,  # noqa: E402
                              save_adapter, unmerge)

STEPS = 3
GLOBAL_BATCH = 4  # rows; each of the 2 ranks trains on 2
SEQ = 12
LR = 2.0
ADAMW_LR = 1e-2


def build_model(preset: str, ckpt, quantized: bool = False) -> torch.nn.Module:
    """The tiny LLaMA (hidden 32, 2 layers, vocab 97) with a rank-4 adapter, identical on every call;
    ``quantized``: its decoder linears reloaded as bitsandbytes 4-bit (NF4) layers (QLoRA-style)."""
    torch.manual_seed(0)
    model = tiny_llama(n_layer=2, hidden=32)
    if quantized:
        model = _as_4bit(model)
    inject(model, TiedLoRAConfig(rank=4, preset=preset, seed=3))
    with torch.no_grad():
        # Move the zero-initialised factor off zero, so every trained tensor gets a gradient at step 1.
        g = torch.Generator().manual_seed(11)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.train()
    if ckpt == "reentrant":
        model.enable_input_require_grads()  # reentrant checkpoint: no gradient flows unless an input needs one
        model.activation_checkpointing_enable({"use_reentrant": True})
    elif ckpt:
        model.activation_checkpointing_enable()  # transformers' default: non-reentrant checkpoint
    return model


def _as_4bit(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` saved and loaded back with transformers' ``BitsAndBytesConfig`` (4-bit NF4, fp32
    compute, CPU), as users load a QLoRA base; the quantization is deterministic, so every rank
    holds the same base."""
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as path:
        # Not save_pretrained: under torch.distributed it writes on rank 0 only; each rank needs its own copy.
        model.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{path}/model.safetensors",
                  metadata={"format": "pt"})
        return load_quantized(path, 4)


def global_batch(step: int) -> torch.Tensor:
    """Token ids (GLOBAL_BATCH, SEQ) of one step, the same on every rank."""
    return torch.randint(0, 97, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(100 + step))


def make_optimizer(model: torch.nn.Module, kind: str = "sgd") -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":  # state per parameter (moments, step): what a resumed run must get back
        return torch.optim.AdamW(params, lr=ADAMW_LR)
    # Plain SGD: the update is the gradient itself, so a wrong reduction (sum for mean, a tied
    # gradient reduced twice or not at all) shows up in the parameters at full size.
    return torch.optim.SGD(params, lr=LR)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(forward, opt, rows: slice, after_backward=None, steps: range = range(STEPS)) -> None:
    """An optimizer step of ``forward`` (a model or its wrapper) on ``global_batch(step)[rows]`` for each of ``steps``."""
    for step in steps:
        ids = global_batch(step)[rows]
        opt.zero_grad(set_to_none=True)
        forward(ids, labels=ids).loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()


def train_single(preset: str, ckpt: bool, rows: slice = slice(None), quantized: bool = False,
                 shards: int = 1, optimizer: str = "sgd") -> dict[str, torch.Tensor]:
    """One process, ``STEPS`` steps on ``global_batch(step)[rows]``: the result DDP must reproduce.
    ``shards`` > 1: each step's gradient is the mean of the gradients of ``shards`` equal row slices,
    taken one after the other (DDP's arithmetic, without the processes)."""
    model = build_model(preset, ckpt, quantized)
    if shards == 1:
        train(model, make_optimizer(model, optimizer), rows)
        return trainable_state(model)
    opt = make_optimizer(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(STEPS):
        ids = global_batch(step)[rows]
        size = ids.shape[0] // shards
        total = [torch.zeros_like(p) for p in params]
        for k in range(shards):
            opt.zero_grad(set_to_none=True)
            part = ids[k * size:(k + 1) * size]
            model(part, labels=part).loss.backward()
            for t, p in zip(total, params):
                t += p.grad / shards  # as DDP: each rank's gradient divided by the world size, then summed
        for t, p in zip(total, params):
            p.grad = t
        opt.step()
    return trainable_state(model)


def _run_ddp(case: dict, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_model(case["preset"], case["ckpt"], case.get("quantized", False))
    ddp = DDP(model, static_graph=case.get("static_graph", False))  # find_unused_parameters=False: every trained tensor must get a gradient each step
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    tied = [f.A for f in model.tiedlora.values()] + [f.B for f in model.tiedlora.values()]
    facts = {
        "n_trainable": len(trainable),
        "n_unique_trainable": len({id(p) for p in trainable}),
        "n_named_trainable": sum(p.requires_grad for _, p in model.named_parameters()),
        # How many times each tied factor appears among DDP's parameters (must be exactly once).
        "tied_occurrences": [sum(q is t for q in ddp.parameters()) for t in tied],
        "all_grads_present": True,
    }
    half = GLOBAL_BATCH // world

    def check_grads():
        facts["all_grads_present"] &= all(p.grad is not None for p in trainable)

    train(ddp, make_optimizer(model), slice(rank * half, (rank + 1) * half), check_grads)
    if rank == 0 and case.get("save_dir"):
        save_adapter(ddp.module, case["save_dir"])  # the wrapped module is the plain model
    return {"params": trainable_state(model), "facts": facts}


def _sharded_model(case: dict, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_model(case["preset"], case["ckpt"])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    # The root unit owns everything not inside a decoder layer: embeddings, norm, head and
    # model.tiedlora, i.e. the tied A and B, registered only there.
    fully_shard(model, mesh=mesh)
    return model


def _state_layout(opt: torch.optim.Optimizer) -> list[dict]:
    """Per parameter, each optimizer state entry's type and local shape (a DTensor's: this rank's shard)."""
    return [{k: (type(v).__name__, tuple(v.to_local().shape if hasattr(v, "to_local") else v.shape))
             for k, v in sorted(opt.state[p].items())} for g in opt.param_groups for p in g["params"]]


def _refusal(op, *args):
    """``op(*args)``'s exception as text, or None when it ran."""
    try:
        op(*args)
    except Exception as e:  # noqa: BLE001 - recorded whatever it is; the test says what it must be
        return f"{type(e).__name__}: {e}"
    return None


def _run_fsdp2(case: dict, rank: int, world: int) -> dict:
    from torch.distributed.tensor import DTensor

    model = _sharded_model(case, world)
    tied_names = [f"tiedlora.{g}.{w}" for g in model.tiedlora for w in ("A", "B")]
    named = dict(model.named_parameters())
    facts = {
        "tied_are_dtensors": all(isinstance(named[n], DTensor) for n in tied_names),
        "n_named_trainable": sum(p.requires_grad for p in named.values()),
        # Refused before any layer changes (the training below must still give the single-process result).
        "refused": {"merge": _refusal(merge, model), "unmerge": _refusal(unmerge, model),
                    "export_peft": _refusal(export_peft, model, f"{case['save_dir']}-peft")},
        "n_merged": sum(layer.merged for _, layer in adapted_layers(model)),
    }
    half = GLOBAL_BATCH // world
    rows = slice(rank * half, (rank + 1) * half)
    opt = make_optimizer(model, case.get("optimizer", "sgd"))
    resume_after = case.get("resume_after")
    if resume_after is None:
        train(model, opt, rows)
    else:
        train(model, opt, rows, steps=range(resume_after))
        facts["state_saved"] = _state_layout(opt)
        checkpoint = f"{case['save_dir']}-step{resume_after}"
        save_adapter(model, checkpoint, optimizer=opt)  # every rank (shards are gathered), rank 0 writes
        torch.distributed.barrier()  # the files are written before any rank reads them
        model = _sharded_model(case, world)
        opt = make_optimizer(model, case["optimizer"])
        load_adapter(model, checkpoint, optimizer=opt)
        facts["state_loaded"] = _state_layout(opt)
        train(model, opt, rows, steps=range(resume_after, STEPS))
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}
    if case.get("save_dir"):
        # Straight on the sharded model: every rank calls it (shards are gathered), rank 0 writes.
        save_adapter(model, case["save_dir"])
    return {"params": full, "facts": facts}


def main() -> None:
    import torch.distributed as dist

    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # A rank that dies must not leave the other one waiting for ever.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        for case in cases:
            run = _run_fsdp2 if case["wrap"] == "fsdp2" else _run_ddp
            if case.get("expect_error"):
                # A configuration that must be refused: record torch's message instead of dying.
                try:
                    result = {"params": run(case, rank, world)["params"], "error": None}
                except RuntimeError as e:
                    result = {"params": None, "error": str(e)}
            else:
                result = run(case, rank, world)
            if rank == 0:
                torch.save(result, out_dir / f"{case['name']}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
