"""Data-parallel training with tied factors: real ``torch.distributed`` (gloo, 2 CPU processes).

Tied A and B are used by every layer of a kind but registered once (on ``model.tiedlora``), so
DDP must see each once, reduce its gradient once, and the result of N steps on two half
batches must equal one process on the whole batch (the loss is a mean over equal-size halves,
so the DDP average of the half-batch gradients is the full-batch gradient). FSDP2
(``fully_shard``) is checked the same way, the tied factors owned by the root unit; an AdamW run saved
and resumed in a fresh sharded model must equal an uninterrupted one, and merge / unmerge of a sharded
model are refused before anything changes.

One spawn (two processes) runs every case; startup costs more than the training.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import rel_err
from tiedlora_kernels import load_adapter

WORKER = Path(__file__).with_name("_ddp_worker.py")
_spec = importlib.util.spec_from_file_location("tiedlora_ddp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

WORLD_SIZE = 2
#: Tolerances of the distributed checks (fp32 throughout; the only difference from one process is
#: the order of the gradient sum: two half-batch means averaged by all-reduce vs one mean).
TOL = {
    "param_rel": 1e-5,     # ||p_dist - p_single|| / ||p_single|| per trained tensor after STEPS steps
    "update_rel": 1e-4,    # the same on the update p - p_init (what training changed)
    "control_min": 1e-1,   # a single process on rank 0's half batch must differ by at least this
}

PRESETS = ("lora", "vera", "tl6")
CASES = ([{"name": f"ddp-{p}-{'ckpt' if c else 'nockpt'}", "preset": p, "ckpt": c, "wrap": "ddp"}
          for p in PRESETS for c in (False, True)]
         + [{"name": f"fsdp2-{p}-{'ckpt' if c else 'nockpt'}", "preset": p, "ckpt": c, "wrap": "fsdp2"}
            for p in PRESETS for c in (False, True)]
         # Reentrant checkpointing re-runs each layer's backward separately, so a tied factor's
         # gradient hook fires once per layer: DDP needs static_graph=True (FSDP2 does not).
         + [{"name": "ddp-tl6-reentrant-static", "preset": "tl6", "ckpt": "reentrant", "wrap": "ddp",
             "static_graph": True},
            {"name": "fsdp2-tl6-reentrant", "preset": "tl6", "ckpt": "reentrant", "wrap": "fsdp2"},
            # AdamW, saved with its state after 2 steps and resumed in a fresh sharded model for the last.
            {"name": "fsdp2-tl6-adamw-resumed", "preset": "tl6", "ckpt": False, "wrap": "fsdp2",
             "optimizer": "adamw", "resume_after": 2},
            # Last: the refused configuration (both ranks raise at the same point).
            {"name": "ddp-tl6-reentrant-dynamic", "preset": "tl6", "ckpt": "reentrant", "wrap": "ddp",
             "expect_error": True}]
         # Over a 4-bit (bitsandbytes NF4) base, QLoRA-style: the frozen quantized weights are no
         # parameter DDP reduces; the tied factors are reduced once as over a dense base.
         + ([{"name": f"ddp-{p}-4bit", "preset": p, "ckpt": False, "wrap": "ddp", "quantized": True}
             for p in ("tl6", "dora")] if importlib.util.find_spec("bitsandbytes") else []))
TRAINED = [c for c in CASES if not c.get("expect_error")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> dict:
    """Run every case once in a 2-process gloo group; {case name: what rank 0 saved}."""
    out = tmp_path_factory.mktemp("ddp")
    cases = [{**c, "save_dir": str(out / f"{c['name']}-adapter")} for c in CASES]
    port = _free_port()
    procs, logs = [], []
    for rank in range(WORLD_SIZE):
        log = open(out / f"rank{rank}.log", "w+")
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD_SIZE), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "TIEDLORA_BACKEND": "torch"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), json.dumps(cases)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    try:
        codes = [p.wait(timeout=150) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = []
    for log in logs:
        log.seek(0)
        text.append(log.read()[-3000:])
        log.close()
    assert codes == [0] * WORLD_SIZE, f"workers exited with {codes}:\n" + "\n---\n".join(text)
    return {c["name"]: {**torch.load(out / f"{c['name']}.pt"), "save_dir": c["save_dir"]} for c in cases}


@pytest.mark.parametrize("case", TRAINED, ids=[c["name"] for c in TRAINED])
def test_distributed_steps_equal_one_process_on_the_whole_batch(dist_results, case):
    got = dist_results[case["name"]]
    quantized = case.get("quantized", False)
    # Over a 4-bit base the whole batch and the mean of the two half-batch gradients part by ~4e-4
    # after the three lr = 2 steps in one process already (each adapted 4-bit layer alone agrees to
    # 1e-7: the quantized model amplifies rounding). There the oracle is that mean, computed in one
    # process (worker.train_single(shards=...)), at the same tolerances: what DDP must reproduce.
    optimizer = case.get("optimizer", "sgd")
    single = worker.train_single(case["preset"], case["ckpt"], quantized=quantized,
                                 shards=WORLD_SIZE if quantized else 1, optimizer=optimizer)
    control = worker.train_single(case["preset"], case["ckpt"], rows=slice(0, worker.GLOBAL_BATCH // WORLD_SIZE),
                                  quantized=quantized, optimizer=optimizer)
    init = worker.trainable_state(worker.build_model(case["preset"], case["ckpt"], quantized))

    assert set(got["params"]) == set(single), "distributed and single runs train different tensors"
    for name, want in single.items():
        have = got["params"][name]
        assert have.shape == want.shape and have.dtype == want.dtype, name
        assert rel_err(have, want) < TOL["param_rel"], (name, rel_err(have, want))
        assert rel_err(have - init[name], want - init[name]) < TOL["update_rel"], name
    # The check can fail: training on one half only (no gradient exchange) lands far away.
    worst = max(rel_err(control[n] - init[n], single[n] - init[n]) for n in single)
    assert worst > TOL["control_min"], worst


@pytest.mark.parametrize("case", TRAINED, ids=[c["name"] for c in TRAINED])
def test_adapter_saved_after_distributed_training_loads_into_a_plain_model(dist_results, case):
    """DDP: rank 0 saves ``ddp.module``; FSDP2: the gathered-state-dict recipe of docs/DISTRIBUTED.md."""
    got = dist_results[case["name"]]
    fresh = worker.tiny_llama(n_layer=2, hidden=32)
    base = worker.build_model(case["preset"], case["ckpt"]).state_dict()
    fresh.load_state_dict({k: v for k, v in base.items() if not k.startswith("tiedlora.") and ".adapter_" not in k},
                          strict=False)
    load_adapter(fresh, got["save_dir"])
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, got["params"][name]), name


@pytest.mark.parametrize("case", [c for c in TRAINED if c["wrap"] == "ddp"],
                         ids=[c["name"] for c in TRAINED if c["wrap"] == "ddp"])
def test_ddp_sees_each_tied_factor_once_and_every_trained_tensor_gets_a_gradient(dist_results, case):
    facts = dist_results[case["name"]]["facts"]
    assert facts["n_trainable"] == facts["n_unique_trainable"] == facts["n_named_trainable"]
    assert facts["tied_occurrences"] and set(facts["tied_occurrences"]) == {1}
    # find_unused_parameters=False was enough: no trained tensor went without a gradient.
    assert facts["all_grads_present"]


@pytest.mark.parametrize("case", [c for c in TRAINED if c["wrap"] == "fsdp2"],
                         ids=[c["name"] for c in TRAINED if c["wrap"] == "fsdp2"])
def test_fsdp2_shards_the_tied_factors_in_the_root_unit(dist_results, case):
    facts = dist_results[case["name"]]["facts"]
    assert facts["tied_are_dtensors"]
    assert facts["n_named_trainable"] == len(dist_results[case["name"]]["params"])


@pytest.mark.parametrize("case", [c for c in TRAINED if c["wrap"] == "fsdp2"],
                         ids=[c["name"] for c in TRAINED if c["wrap"] == "fsdp2"])
def test_merge_unmerge_and_export_of_a_sharded_model_are_refused(dist_results, case):
    """Each rank holds only its shard of the weights to rewrite: merge ran on some models and failed on others
    part way ("mixed torch.Tensor and DTensor"). Refused, naming what to do, before any layer changed (the
    training that followed gave the single-process result: see the first test), as export_peft is."""
    facts = dist_results[case["name"]]["facts"]
    advice = {"merge": "load_adapter into an unsharded copy of the model (in one process) and merge that",
              "unmerge": "load_adapter into an unsharded copy of the model (in one process) and unmerge that",
              "export_peft": "export from one process with the full model"}
    for op, error in facts["refused"].items():
        assert error is not None and error.startswith(f"ValueError: {op}: layer 'model.layers.0."), (op, error)
        assert "holds sharded (FSDP2 / DTensor) tensors" in error and advice[op] in error, (op, error)
    assert set(facts["refused"]) == set(advice)
    assert facts["n_merged"] == 0
    assert not os.path.exists(f"{dist_results[case['name']]['save_dir']}-peft")


def test_fsdp2_resume_restores_the_optimizer_state_as_the_optimizer_keeps_it(dist_results):
    """load_adapter(optimizer=) put whole moments next to sharded parameters, and the next AdamW step
    failed ("aten.lerp_.Scalar got mixed torch.Tensor and DTensor"). Now each rank gets its shard of
    them, and ``step`` stays the plain tensor AdamW keeps; the resumed run's result (compared with one
    process by the first test) is what 3 uninterrupted steps give."""
    facts = dist_results["fsdp2-tl6-adamw-resumed"]["facts"]
    assert facts["state_loaded"] == facts["state_saved"]
    first = facts["state_saved"][0]
    assert first["exp_avg"][0] == first["exp_avg_sq"][0] == "DTensor" and first["step"] == ("Tensor", ())


def test_ddp_with_reentrant_checkpointing_needs_static_graph(dist_results):
    err = dist_results["ddp-tl6-reentrant-dynamic"]["error"]
    assert err is not None and "marked as ready twice" in err and "tiedlora." in err
