"""The many-adapters op (``tiedlora_kernels/ops/bank_linear.py``: the shared-factor kernel
``bank_term``, the segmented kernel ``bank_segment_term``, and the torch route) against the oracle:
each adapter's rows through the float64 single-adapter reference (``reference.tied_lora_linear``),
one forward per adapter on its rows.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest), so shapes stay small;
tests marked ``cuda`` take realistic shapes wherever a GPU is at hand.
"""

import importlib

import pytest
import torch

from helpers import rel_err
from tiedlora_kernels import reference
from tiedlora_kernels.ops import triton_interpreting
from tiedlora_kernels.ops.bank_linear import AdapterRows, CallFrame, bank_linear

if not (torch.cuda.is_available() or triton_interpreting()):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

pytestmark = [] if torch.cuda.is_available() else [pytest.mark.interpreter]

common = importlib.import_module("tiedlora_kernels.ops.common")
shared_kernel = importlib.import_module("tiedlora_kernels.ops.bank_term")
segment_kernel = importlib.import_module("tiedlora_kernels.ops.bank_segment_term")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: ‖out − ref‖ / ‖ref‖ against the float64 oracle on the inputs as given (as tests/ops/test_tied_lora.py).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: Which factors are stored per slot: "shared" (both shared: bank_term), else bank_segment_term.
FACTORS = ("shared", "A_per_slot", "B_per_slot", "both_per_slot")


def make(nseq, T, K, N, R, S, *, factors="shared", dtype=torch.float32, factor_dtype=torch.float32, ids=None,
         bias=True, v=True, c=False, seed=0):
    """Random inputs of one layer serving S slots: x (nseq, T, K), W, b, ids, A, B, U, V, C."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    dev = lambda t, dt: t.to(DEVICE, dt)  # noqa: E731
    if ids is None:  # slot 0 first (an adapter always runs), then every slot in turn, -1 (base only) among
        ids = [(i + 1) % (S + 1) - 1 for i in range(nseq)]  # them once nseq > S, unused slots once S > nseq
    t = dict(x=dev(rnd(nseq, T, K), dtype), weight=dev(rnd(N, K) / K**0.5, dtype),
             bias=dev(rnd(N), dtype) if bias else None,
             ids=torch.tensor(ids, device=DEVICE),
             A=dev(rnd(*((S,) if factors in ("A_per_slot", "both_per_slot") else ()), R, K) / K**0.5, factor_dtype),
             B=dev(rnd(*((S,) if factors in ("B_per_slot", "both_per_slot") else ()), N, R), factor_dtype),
             U=dev(rnd(S, R), torch.float32), V=dev(rnd(S, N), torch.float32) if v else None,
             C=dev(1 + 0.5 * rnd(S, N), torch.float32) if c else None)
    return t


def oracle(t):
    """float64: for each adapter, its rows through reference.tied_lora_linear (U as u, scaling 1);
    rows with id -1 through the base layer alone."""
    x, W = t["x"].double(), t["weight"].double()
    b = t["bias"].double() if t["bias"] is not None else None
    ids = t["ids"]
    x2 = x.reshape(-1, x.shape[-1]) if ids.dim() == 2 else x
    flat = ids.reshape(-1)
    out = torch.empty((*x2.shape[:-1], W.shape[0]), dtype=torch.float64, device=x.device)
    for a in flat.unique().tolist():
        rows = (flat == a).nonzero().squeeze(1)
        if a < 0:
            out[rows] = torch.nn.functional.linear(x2[rows], W, b)
            continue
        pick = lambda f: (f[a] if f.dim() == 3 else f).double()  # noqa: E731
        V = t["V"][a].double() if t["V"] is not None else None
        C = t["C"][a].double() if t["C"] is not None else None
        out[rows] = reference.tied_lora_linear(x2[rows], W, b, pick(t["A"]), pick(t["B"]), t["U"][a].double(), V,
                                               1.0, row_scale=C)
    return out.reshape(*x.shape[:-1], W.shape[0])


def call(t, ids=None):
    with torch.no_grad():
        return bank_linear(t["x"], t["weight"], t["bias"], t["ids"] if ids is None else ids, t["A"], t["B"], t["U"],
                           t["V"], t["C"])


def check(t, backend="triton", monkeypatch=None, tol=None):
    if monkeypatch is not None:
        monkeypatch.setenv("TIEDLORA_BACKEND", backend)
    out = call(t)
    ref = oracle(t)
    assert out.dtype == t["x"].dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < (tol or TOL[t["x"].dtype]), f"rel err {err:.2e}"
    return out


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", request.param)
    return request.param


#: (sequences, tokens, K, N, R, slots): odd sizes, rank 1, one row, more slots than rows.
SHAPES = [(5, 3, 33, 40, 3, 4), (1, 1, 5, 3, 1, 1), (7, 1, 33, 17, 16, 9), (3, 11, 65, 70, 5, 2),
          (2, 37, 16, 48, 1, 3)]


@pytest.mark.parametrize("factors", FACTORS)
@pytest.mark.parametrize("nseq,T,K,N,R,S", SHAPES,
                         ids=[f"B{b}-T{t}-K{k}-N{n}-R{r}-S{s}" for b, t, k, n, r, s in SHAPES])
def test_parity_shapes(nseq, T, K, N, R, S, factors, backend):
    check(make(nseq, T, K, N, R, S, factors=factors))


@pytest.mark.parametrize("factors", FACTORS)
@pytest.mark.parametrize("dtype,factor_dtype", [(torch.float16, torch.float32), (torch.float16, torch.float16),
                                                (torch.bfloat16, torch.float32)],
                         ids=["fp16-act-fp32-factors", "fp16-act-fp16-factors", "bf16-act-fp32-factors"])
def test_low_precision(dtype, factor_dtype, factors, backend):
    check(make(6, 5, 33, 40, 16, 4, factors=factors, dtype=dtype, factor_dtype=factor_dtype))


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_fp16_activations_keep_small_fp32_factors(factors, factor_dtype, backend):
    """fp16 x with fp32 (or bf16: ``AdapterBank(factor_dtype=torch.bfloat16)``) factors of magnitude
    ~1e-6 (fp16 subnormals): the dot over x must not round A to fp16 (the single-adapter kernel's
    WIDE_DOT rule). The base weight is 0, so the output is the adapter term alone and its error shows."""
    t = make(5, 3, 33, 40, 4, 4, factors=factors, dtype=torch.float16, bias=False)
    t["A"] = (t["A"] * 1e-5).to(factor_dtype)
    t["U"] = t["U"] * 1e5
    t["weight"] = torch.zeros_like(t["weight"])
    check(t)


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_fp16_intermediates_beyond_fp16_range_stay_finite(factors, backend):
    """fp16 x and factors with h = x A^T past 65504 and a small U, so the output fits fp16: both routes
    keep h in fp32 and stay finite (the torch route formed h in fp16: inf, then NaN)."""
    t = make(5, 3, 33, 40, 4, 4, factors=factors, dtype=torch.float16, factor_dtype=torch.float16)
    t["x"] = t["x"] * 30
    t["A"] = t["A"] * 5000
    t["U"] = torch.full_like(t["U"], 1e-4)
    A0 = t["A"][0] if t["A"].dim() == 3 else t["A"]
    assert oracle(t).abs().max() < 1e4 and (t["x"].double() @ A0.double().T).abs().max() > 65504
    check(t)


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_base_only_rows_read_no_factor(factors, backend):
    """Rows with id -1 get the base layer alone, whatever the factors hold: a non-finite B (slot 0's,
    or a shared one) must not reach them through 0 * B."""
    t = make(4, 3, 33, 40, 3, 2, factors=factors, ids=[-1, 1, -1, 1] if factors != "shared" else [-1, -1, -1, -1])
    t["B"][0] = float("nan")
    out, ref = call(t), oracle(t)
    assert torch.isfinite(out).all() and rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
@pytest.mark.parametrize("bias,v,c", [(False, False, False), (True, False, True), (False, True, True)],
                         ids=["no-bias-no-v", "bias-rowscale", "v-rowscale-no-bias"])
def test_optional_tensors(bias, v, c, factors, backend):
    check(make(5, 3, 33, 40, 3, 4, factors=factors, bias=bias, v=v, c=c))


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
@pytest.mark.parametrize("ids", [[-1, -1, -1], [2, 2, 2], [0, 1, 2]], ids=["all-base", "one-adapter", "all-distinct"])
def test_id_patterns(ids, factors, backend):
    check(make(3, 4, 33, 40, 3, 3, factors=factors, ids=ids))


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_ids_per_token(factors, backend):
    """(batch, seq) ids: every token its own adapter (a batch of sequences packed into rows)."""
    t = make(3, 4, 33, 40, 3, 4, factors=factors)
    t["ids"] = torch.tensor([[0, 1, -1, 3], [3, 3, 2, -1], [1, 0, 0, 2]], device=DEVICE)
    check(t)


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_ids_per_token_on_a_layer_with_one_row_per_sequence(factors, backend):
    """(batch, seq) ids on (batch, K) activations (a pooled layer: BERT's pooler reads each sequence's
    first token): one id per sequence where each sequence's ids are all equal; a sequence whose tokens
    name several adapters is refused, naming it (the layer has one row for the whole sequence). Under
    the model call's frame, OPT's flattened (batch * seq, K) rows take one id each."""
    t = make(3, 1, 33, 40, 3, 4, factors=factors, ids=[2, -1, 0])
    pooled = dict(t, x=t["x"][:, 0])
    expected = call(pooled)
    per_token = torch.tensor([[2, 2, 2, 2], [-1, -1, -1, -1], [0, 0, 0, 0]], device=DEVICE)
    assert torch.equal(call(pooled, ids=per_token), expected)
    mixed = per_token.clone()
    mixed[1, 2] = 3
    with pytest.raises(ValueError, match=r"adapter_ids has shape \(3, 4\) \(one slot per token\) but this layer's "
                                         r"activations have leading shape \(3,\): one row per sequence \(a pooled "
                                         r"layer.*sequence 1 has tokens of several \(\[-1, 3\]\)"):
        call(pooled, ids=mixed)
    tokens = make(3, 4, 33, 40, 3, 4, factors=factors)
    tokens["ids"] = torch.tensor([[0, 1, -1, 3], [3, 3, 2, -1], [1, 0, 0, 2]], device=DEVICE)
    out = check(tokens)
    rows = AdapterRows(tokens["ids"], 4, device=DEVICE)
    rows.frames.append(CallFrame(3, 4))
    assert torch.equal(call(dict(tokens, x=tokens["x"].reshape(12, 33)), ids=rows), out.reshape(12, 40))


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_ids_int32_and_list(factors, backend):
    t = make(4, 3, 33, 40, 3, 4, factors=factors, ids=[3, -1, 0, 3])
    ref = call(t)
    assert torch.equal(call(t, ids=t["ids"].to(torch.int32)), ref)
    assert torch.equal(call(t, ids=[3, -1, 0, 3]), ref)


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_strided_inputs(factors, backend):
    """x transposed in storage, factors and U / V as strided views: read in place through their strides."""
    t = make(4, 5, 33, 40, 3, 4, factors=factors)
    t["x"] = t["x"].transpose(0, 1).contiguous().transpose(0, 1)
    t["U"] = torch.cat([t["U"], t["U"]], dim=1)[:, ::2]
    t["V"] = t["V"].t().contiguous().t()
    t["A"] = torch.cat([t["A"], t["A"]], dim=-1)[..., ::2]
    t["B"] = t["B"].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not t["x"].is_contiguous() and not t["U"].is_contiguous() and not t["A"].is_contiguous()
    check(t)


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_column_splits(factors, monkeypatch, nan_allocations):
    """As on a GPU in decode: few row blocks, so the columns are split over programs (the
    interpreter otherwise runs one split)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    monkeypatch.setattr(common, "target_programs", lambda device: 12)
    check(make(7, 1, 33, 100, 5, 4, factors=factors))


@pytest.mark.parametrize("factors", FACTORS)
def test_nan_poisoned_allocations(factors, monkeypatch, nan_allocations):
    """torch.empty returns NaN: every output element must be written (rows of -1 included)."""
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    check(make(9, 3, 33, 40, 3, 5, factors=factors))
    check(make(9, 3, 33, 40, 3, 5, factors=factors, bias=False, c=True))


def test_triton_route_runs_the_kernels(monkeypatch):
    """TIEDLORA_BACKEND=triton: shared factors take bank_term, per-slot ones bank_segment_term; torch neither."""
    calls = []
    for mod, fn in ((shared_kernel, "bank_term"), (segment_kernel, "bank_segment_term")):
        original = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _f=original, _n=fn, **k: calls.append(_n) or _f(*a, **k))
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    call(make(3, 2, 16, 8, 2, 2))
    call(make(3, 2, 16, 8, 2, 2, factors="B_per_slot"))
    assert calls == ["bank_term", "bank_segment_term"]
    monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
    call(make(3, 2, 16, 8, 2, 2))
    assert calls == ["bank_term", "bank_segment_term"]


@pytest.mark.parametrize("factors", ["shared", "both_per_slot"])
def test_which_rows_an_id_covers(factors, backend):
    """(n,) ids: x's first dim is the batch; (n * seq, K) when the model call's frame says n sequences
    of seq tokens (OPT flattens them); the call's batch n / e when every e consecutive ids are equal
    and the call is an encoder run before generate expands the batch (ids repeated for its beams).
    Nothing the call does not account for is guessed: ids short of the batch, a vision tower's
    patches, repeated ids on any other call (a decoder-only model's batch: 4 ids for 2 prompts ran)."""
    from tiedlora_kernels.ops.bank_linear import AdapterRows

    ids = torch.tensor([2, -1, 0], device=DEVICE)
    t = make(3, 4, 33, 40, 3, 4, factors=factors, ids=ids.tolist())
    out = check(t)
    rows = AdapterRows(ids, 4, device=DEVICE)
    rows.frames.append(CallFrame(3, 4))
    flat = dict(t, x=t["x"].reshape(12, 33))
    assert torch.equal(call(flat, ids=rows), out.reshape(12, 40))
    with pytest.raises(ValueError, match=r"adapter_ids has 3 entries .* \(first dim 12\); give one id per "
                                         "sequence of the batch"):
        call(flat, ids=ids)  # no frame: 12 rows are not guessed to be 3 x 4
    repeated = AdapterRows(ids.repeat_interleave(2), 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"adapter_ids has 6 entries .* \(first dim 3\)"):
        call(t, ids=repeated)  # 3 rows for 6 ids, and no call says its batch is 3: a vision tower's images
    repeated.frames.append(CallFrame(3, 5))  # a model called on 3 prompts: 6 ids do not fit it
    with pytest.raises(ValueError, match=r"adapter_ids has 6 entries .* \(first dim 3\)"):
        call(t, ids=repeated)
    repeated.frames.append(CallFrame(3, None, before_expansion=True))  # an encoder, before 2 beams each
    assert torch.equal(call(t, ids=repeated), out)
    with pytest.raises(ValueError, match=r"adapter_ids has 2 entries .* \(first dim 3\)"):
        call(t, ids=ids[:2])
    with pytest.raises(ValueError, match=r"adapter_ids has 6 entries .* \(first dim 3\)"):
        call(t, ids=torch.tensor([2, -1, -1, 0, 0, 2], device=DEVICE))  # pairs not equal: not repeated ids


def test_autocast_casts_x_and_the_base_layer(backend):
    """Under torch.autocast (fp32 x and base layer, bf16 autocast): x, W and b cast to bf16 as
    F.linear casts them, the factors kept, as the single-adapter op does; out in bf16."""
    t = make(5, 3, 33, 40, 3, 4, factors="both_per_slot", c=True)
    cast = dict(t, **{k: t[k].to(torch.bfloat16) for k in ("x", "weight", "bias")})
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = call(t)
    assert out.dtype == torch.bfloat16 and torch.equal(out, call(cast))


def test_empty_batch(backend):
    t = make(1, 3, 33, 40, 3, 2)
    t["x"], t["ids"] = t["x"][:0], t["ids"][:0]
    assert call(t).shape == (0, 3, 40)


def test_same_result_every_call():
    """No atomics, no order dependence: ten calls, bitwise equal."""
    t = make(9, 3, 33, 40, 3, 5, factors="both_per_slot")
    first = call(t)
    assert all(torch.equal(call(t), first) for _ in range(9))


def test_segment_plan_covers_every_row_once():
    ids = torch.tensor([3, -1, 0, 3, 3, 1, -1, 0])
    T, bm = 5, 16
    plan = segment_kernel.segment_plan(ids, T, "cpu", block_m=bm)
    perm = plan.perm.long()
    assert sorted(perm.tolist()) == list(range(ids.numel() * T))
    row_slot = ids.repeat_interleave(T)
    for s, lo, hi in zip(plan.tile_slot.tolist(), plan.tile_lo.tolist(), plan.tile_hi.tolist()):
        assert 0 < hi - lo <= bm
        assert (row_slot[perm[lo:hi]] == s).all()
    covered = sorted(i for lo, hi in zip(plan.tile_lo.tolist(), plan.tile_hi.tolist()) for i in range(lo, hi))
    assert covered == list(range(ids.numel() * T))
    assert plan.slots == [-1, 0, 1, 3] and plan.bounds == [0, 10, 20, 25, 40]


# ---------------------------------------------------------------------------------------------------------
# Bad input: errors that name the argument, raised before any launch.


def test_ids_checks_name_the_argument():
    t = make(3, 2, 16, 8, 2, 4)
    cases = [(t["ids"].float(), TypeError, "adapter_ids must be an integer tensor"),
             (t["ids"].bool(), TypeError, "adapter_ids must be an integer tensor"),
             ("0,1", TypeError, "adapter_ids must be an integer tensor"),
             ([0, 1.5, 2], TypeError, "adapter_ids: a list must hold ints"),
             (torch.tensor([0, 4, 1]), ValueError, r"adapter_ids\[1\] = 4 is out of range"),
             (torch.tensor([0, -2, 1]), ValueError, r"adapter_ids\[1\] = -2 is out of range"),
             (torch.tensor([0, 1]), ValueError, r"adapter_ids has 2 entries .*\(first dim 3\); give one id per sequence"),
             (torch.tensor([[0, 1, 2]]), ValueError, r"adapter_ids has shape \(1, 3\)"),
             (torch.zeros(3, 2, 1, dtype=torch.long), ValueError, "adapter_ids must be"),
             (torch.tensor([0, 1, 2], device="meta"), ValueError, "adapter_ids is on meta")]
    for ids, err, msg in cases:
        with pytest.raises(err, match=msg):
            call(t, ids=ids)


def test_device_named_without_its_index():
    """"cpu:0" ("cuda") names the device a tensor reports as cpu (cuda:0): ids there are accepted."""
    named = "cpu:0" if DEVICE == "cpu" else "cuda"
    assert AdapterRows([0, -1], 2, device=named).device == torch.empty(0, device=DEVICE).device


def test_empty_slot_refused():
    with pytest.raises(ValueError, match=r"adapter_ids\[2\] = 1 names an empty slot"):
        AdapterRows(torch.tensor([0, -1, 1]), 3, occupied=[True, False, True], names={0: "a", 2: "c"})


@pytest.mark.parametrize("key,bad,msg", [
    ("A", lambda t: t["A"][:, :-1], r"A must have shape \(3, 33\) or \(4, 3, 33\)"),
    ("B", lambda t: t["B"].t(), r"B must have shape \(40, 3\) or \(4, 40, 3\)"),
    ("V", lambda t: t["V"][:2], r"V must have shape \(4, 40\)"),
    ("C", lambda t: t["V"][:, :5], r"row_scale must have shape \(4, 40\)"),
    ("weight", lambda t: t["weight"].double(), "weight dtype torch.float64 must equal x dtype"),
    ("A", lambda t: t["A"].to("meta"), "A must be on"),
    ("U", lambda t: t["U"][:0], r"U must hold at least one slot"),  # the kernels read a slot's u
    # float8: the dtypes tied_lora_linear takes, not any floating one (the torch route cannot promote
    # float8, the kernels would compute in it and return it)
    ("x", lambda t: t["x"].to(torch.float8_e4m3fn), r"x must be a floating tensor \(\.\.\., K\) \(fp16/bf16/fp32/fp64\)"),
    ("A", lambda t: t["A"].to(torch.float8_e5m2), r"A must be a floating tensor \(fp16/bf16/fp32/fp64\)"),
], ids=["A-shape", "B-shape", "V-shape", "row_scale-shape", "weight-dtype", "A-device", "no-slots", "x-float8",
        "A-float8"])
def test_tensor_checks_name_the_argument(key, bad, msg):
    t = make(3, 2, 33, 40, 3, 4)
    t[key] = bad(t)
    with pytest.raises((ValueError, TypeError), match=msg):
        call(t)


@pytest.mark.parametrize("name", ["x", "weight", "bias", "A", "B", "U", "V", "C"])
def test_inference_only(backend, name):
    """Any input that requires grad is refused with grad enabled (the result would have none)."""
    t = make(3, 2, 16, 8, 2, 4, c=True)
    t[name].requires_grad_()
    # (a forced Triton route refuses a trainable base layer before this check, and without grad too)
    with pytest.raises((RuntimeError, ValueError), match=f"{'row_scale' if name == 'C' else name} requires grad"):
        bank_linear(t["x"], t["weight"], t["bias"], t["ids"], t["A"], t["B"], t["U"], t["V"], t["C"])
    if name not in ("weight", "bias") or backend == "torch":
        with torch.no_grad():
            bank_linear(t["x"], t["weight"], t["bias"], t["ids"], t["A"], t["B"], t["U"], t["V"], t["C"])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_ids_are_copied_when_checked(dtype):
    """The checked ids are the ones the kernels read: a later write to the caller's tensor (here an
    out-of-range slot) changes nothing."""
    ids = torch.tensor([0, 1, 2], dtype=dtype)
    rows = AdapterRows(ids, 3)
    ids[1] = 7
    assert rows.host.tolist() == [0, 1, 2] and rows.ids.tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------
# GPU: realistic shapes, bf16, the cuBLAS GEMM underneath.


@pytest.mark.cuda
@pytest.mark.parametrize("factors", FACTORS)
@pytest.mark.parametrize("nseq,T", [(64, 128), (256, 1)], ids=["prefill-64x128", "decode-256"])
def test_gpu_parity(nseq, T, factors, monkeypatch):
    monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
    S = 300
    ids = torch.randint(-1, S, (nseq,), generator=torch.Generator().manual_seed(0)).tolist()
    t = make(nseq, T, 1024, 1536, 16, S, factors=factors, dtype=torch.bfloat16, ids=ids)
    check(t)
    t = make(nseq, T, 1024, 1536, 16, S, factors=factors, dtype=torch.float16, factor_dtype=torch.bfloat16, ids=ids,
             c=True)
    check(t)


@pytest.mark.cuda
def test_gpu_triton_matches_torch_route(monkeypatch):
    ids = torch.randint(-1, 40, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    for factors in FACTORS:
        t = make(32, 33, 512, 768, 8, 40, factors=factors, ids=ids)
        monkeypatch.setenv("TIEDLORA_BACKEND", "triton")
        fast = call(t)
        monkeypatch.setenv("TIEDLORA_BACKEND", "torch")
        slow = call(t)
        assert rel_err(fast, slow) < 1e-3, factors


def test_row_scale_and_bias_are_rounded_once():
    """b + y * C[a] in fp32, rounded to y's dtype once, as the single-adapter op's epilogue does."""
    from tiedlora_kernels.ops.bank_linear import _scale_rows

    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, 48, generator=g).half()
    C, bias = 1 + torch.randn(3, 48, generator=g), torch.randn(48, generator=g).half()
    slots = torch.randint(-1, 3, (64,), generator=g)
    c = torch.where((slots >= 0)[:, None], C[slots.clamp(min=0)], 1.0)
    assert torch.equal(_scale_rows(y, bias, C, slots), (y.float() * c + bias.float()).half())
