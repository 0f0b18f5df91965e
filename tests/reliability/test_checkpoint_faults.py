"""Checkpoint faults: a saving process killed midway, and files damaged or forged on disk.

The kill trials run ``_save_loop.py`` (saves adapter after adapter into one directory, writing
slowly through a temp file) and SIGKILL it at a chosen point; the directory must then hold one
complete checkpoint (the last one renamed into place), verified by its content hash. The file
trials damage a saved adapter (every single-bit flip of the tensor bytes, truncation at many
lengths, garbage, a pickle) and require a clear refusal.
"""

import importlib.util
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiedlora_kernels import TiedLoRAConfig, adapter_named_parameters, inject, load_adapter, save_adapter
from tiedlora_kernels.integrations.checkpoint import ADAPTER_FILE, CONFIG_FILE, OPTIMIZER_FILE, read_adapter

LOOP = Path(__file__).with_name("_save_loop.py")
_spec = importlib.util.spec_from_file_location("tiedlora_save_loop", LOOP)
loop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(loop)

#: (id, file written slowly, marker to kill at, version whose marker it is, extra marker field,
#:  version that must be on disk afterwards, a temp file of the adapter must be left behind).
KILLS = [
    ("adapter-half-written", ADAPTER_FILE, "MIDWAY", 1, None, 0, True),
    ("adapter-written-not-renamed", ADAPTER_FILE, "WRITTEN", 2, None, 1, True),
    ("bigger-adapter-half-written", ADAPTER_FILE, "MIDWAY", 3, None, 2, True),
    ("adapter-renamed-config-not-yet", ADAPTER_FILE, "REPLACED", 3, ADAPTER_FILE, 3, False),
    ("between-saves", ADAPTER_FILE, "DONE", 4, None, 4, False),
]


def _run_until(directory: Path, slow_file: str, marker: str, version: int, extra, *flags) -> dict[int, str]:
    """Start the save loop, SIGKILL it at (marker, version[, extra]); return {version: content hash}
    of every version it announced."""
    proc = subprocess.Popen([sys.executable, str(LOOP), str(directory), slow_file, marker, str(version),
                             extra or "-", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TIEDLORA_BACKEND": "torch", "OMP_NUM_THREADS": "1"})
    hashes, killed = {}, False
    try:
        for line in proc.stdout:
            word, i, *rest = line.split()
            if word == "BEGIN":
                hashes[int(i)] = rest[0]
            if word == marker and int(i) == version and (extra is None or rest == [extra]):
                proc.send_signal(signal.SIGKILL)  # the loop is stopped at this marker
                killed = True
                break
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait(timeout=30)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert killed and proc.returncode == -signal.SIGKILL, f"never reached {marker} {version}: {err[-2000:]}"
    return hashes


def _adapter_temps(directory: Path) -> list[Path]:
    return sorted(directory.glob(f".{ADAPTER_FILE}.*.tmp"))


@pytest.mark.parametrize("trial", KILLS, ids=[k[0] for k in KILLS])
def test_killed_save_leaves_a_complete_verified_checkpoint(tmp_path, trial):
    _, slow, marker, version, extra, expect, temp_left = trial
    hashes = _run_until(tmp_path, slow, marker, version, extra)

    # The kill really landed inside a save: SIGKILL runs no cleanup, so the half-written temp stays.
    assert bool(_adapter_temps(tmp_path)) == temp_left
    # What is on disk is exactly one announced version, the one renamed last; read_adapter checks
    # the tensors against the hash in the file's metadata.
    _, _, tensors = read_adapter(tmp_path)
    on_disk = loop.ckpt.content_hash(tensors)
    assert on_disk == hashes[expect]
    model = load_adapter(loop.Net(), tmp_path)
    assert loop.saved_hash(model) == hashes[expect]
    torch.testing.assert_close(model(torch.ones(2, 16)), loop.version(expect)(torch.ones(2, 16)), rtol=0, atol=0)

    # The next save into the same directory (stale temp files and all) works and wins.
    fresh = loop.version(7)
    save_adapter(fresh, tmp_path)
    assert loop.saved_hash(load_adapter(loop.Net(), tmp_path)) == loop.saved_hash(fresh)


def test_human_readable_config_may_lag_but_the_adapter_file_is_authoritative(tmp_path):
    hashes = _run_until(tmp_path, ADAPTER_FILE, "REPLACED", 1, ADAPTER_FILE)
    human = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (human["preset"], human["rank"]) == ("tl6", 2)  # adapter_config.json still describes version 0
    config, _, _ = read_adapter(tmp_path)
    assert config.preset == "lora" and config.rank == 6  # the file itself is version 1
    assert loop.saved_hash(load_adapter(loop.Net(), tmp_path)) == hashes[1]


def _resume(directory):
    model = load_adapter(loop.Net(), directory)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    return model, opt


def test_kill_between_optimizer_and_adapter_renames_is_refused_on_resume(tmp_path):
    """The optimizer file is renamed first: killed right after, the directory pairs the old adapter
    with the new moments, and resuming from it must fail loudly rather than mix two saves."""
    hashes = _run_until(tmp_path, OPTIMIZER_FILE, "REPLACED", 1, OPTIMIZER_FILE, "--optimizer")
    model, opt = _resume(tmp_path)
    assert loop.saved_hash(model) == hashes[0]  # the adapter file is still version 0
    with pytest.raises(ValueError, match=r"^load_adapter: the optimizer state .* belongs to another save"):
        load_adapter(model, tmp_path, optimizer=opt)
    assert not opt.state  # nothing restored


def test_kill_while_writing_the_optimizer_keeps_the_previous_pair(tmp_path):
    hashes = _run_until(tmp_path, OPTIMIZER_FILE, "MIDWAY", 1, None, "--optimizer")
    model, opt = _resume(tmp_path)
    load_adapter(model, tmp_path, optimizer=opt)  # version 0's adapter with version 0's moments
    assert loop.saved_hash(model) == hashes[0]
    assert opt.state and all(int(st["step"]) == 1 for st in opt.state.values())


# ---------------------------------------------------------------------------------------------
# Damaged and forged files.

def _saved(tmp_path) -> tuple[Path, torch.Tensor]:
    model = loop.version(1)
    save_adapter(model, tmp_path)
    return tmp_path / ADAPTER_FILE, model(torch.ones(2, 16)).detach()


def _header_len(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


def test_every_single_bit_flip_in_the_tensor_bytes_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    good = path.read_bytes()
    start = _header_len(path)
    refused = 0
    for pos in range(start, len(good)):
        for bit in (0, 7):
            data = bytearray(good)
            data[pos] ^= 1 << bit
            path.write_bytes(bytes(data))
            with pytest.raises(ValueError, match="sha256 mismatch"):
                read_adapter(tmp_path)
            refused += 1
    assert refused == 2 * (len(good) - start) > 1000


def test_every_single_bit_flip_in_the_header_is_refused_or_harmless(tmp_path):
    """Bits of the JSON header (tensor table, config, layer table, hash): each flip is refused with
    a ``load_adapter:`` error, or loads exactly the same adapter. The only harmless flips today
    (~1%) are in the ``format_version`` entry, which nothing reads or hashes."""
    path, out = _saved(tmp_path)
    good = path.read_bytes()
    refused = harmless = 0
    for pos in range(8, _header_len(path)):
        data = bytearray(good)
        data[pos] ^= 1
        path.write_bytes(bytes(data))
        try:
            got = load_adapter(loop.Net(), tmp_path)(torch.ones(2, 16))
        except ValueError as e:
            assert str(e).startswith("load_adapter: "), str(e)
            refused += 1
        else:
            assert torch.equal(got, out), pos
            harmless += 1
    assert refused > 0.95 * (refused + harmless)


def test_truncation_at_any_length_is_refused_with_a_clear_error(tmp_path):
    path, _ = _saved(tmp_path)
    good = path.read_bytes()
    cuts = sorted({0, 1, 7, 8, 9, _header_len(path) - 1, _header_len(path), len(good) - 1,
                   *range(0, len(good), max(1, len(good) // 40))})
    for n in cuts:
        path.write_bytes(good[:n])
        with pytest.raises(ValueError, match="corrupted or truncated"):
            load_adapter(loop.Net(), tmp_path)
    assert len(cuts) > 40


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"not a safetensors file at all",
                                     struct.pack("<Q", 2 ** 62) + b"{}",  # header length far past the end
                                     struct.pack("<Q", 10) + b'{"a":1}   '],  # header that is not a table
                         ids=["empty", "zeros", "text", "huge-header-length", "bad-header"])
def test_garbage_is_refused(tmp_path, content):
    (tmp_path / ADAPTER_FILE).write_bytes(content)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter(loop.Net(), tmp_path)


class _Exploit:
    """Unpickling this would create a marker file: proof that loading executed code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_in_place_of_the_adapter_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    (ckpt_dir / ADAPTER_FILE).write_bytes(pickle.dumps({"tiedlora.proj.A": _Exploit(str(marker))}))
    torch.save({"x": _Exploit(str(marker))}, ckpt_dir / "adapter_model.bin")  # a PEFT-style .bin is ignored
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter(loop.Net(), ckpt_dir)
    (ckpt_dir / ADAPTER_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=ADAPTER_FILE):
        load_adapter(loop.Net(), ckpt_dir)
    assert not marker.exists()


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(3)}, str(tmp_path / ADAPTER_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a tiedlora adapter file"):
        load_adapter(loop.Net(), tmp_path)


def _forged_hash(tensors, meta) -> str:
    """The hash save_adapter would write (tensors, then the config and layer metadata)."""
    return loop.ckpt.content_hash(tensors, meta["format_version"], meta["config"], meta["layers"])


def test_a_dtype_or_shape_forged_consistently_with_the_hash_is_refused(tmp_path):
    """A file rewritten with a valid hash but a tensor of the wrong dtype or shape: the per-tensor
    checks, not the hash, must stop it."""
    from safetensors.torch import safe_open, save_file

    path, _ = _saved(tmp_path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    for forged, what in ((tensors[name].double(), "dtype"), (tensors[name][..., :-1].contiguous(), "shape")):
        bad = {**tensors, name: forged}
        save_file(bad, str(path), metadata={**meta, "sha256": _forged_hash(bad, meta)})
        with pytest.raises(ValueError, match=f"{name!r} has {what}"):
            load_adapter(loop.Net(), tmp_path)


def test_a_failed_load_changes_nothing(tmp_path):
    """load_adapter checks everything before copying: a refused file leaves the model as it was."""
    from safetensors.torch import safe_open, save_file

    path, _ = _saved(tmp_path)
    model = loop.version(1)
    before = {n: p.detach().clone() for n, p in adapter_named_parameters(model)}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    last = sorted(tensors)[-1]
    bad = {k: (t + 1 if k != last else t[..., :-1].contiguous()) for k, t in tensors.items()}
    save_file(bad, str(path), metadata={**meta, "sha256": _forged_hash(bad, meta)})
    with pytest.raises(ValueError, match="has shape"):
        load_adapter(model, tmp_path)
    for n, p in adapter_named_parameters(model):
        assert torch.equal(p, before[n]), n


def _rewrite_metadata(path: Path, edit) -> None:
    """Rewrite the file with the same tensors (and so the same valid content hash), metadata edited."""
    from safetensors.torch import safe_open, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=edit(dict(meta)))


def _edit_config(**changes):
    def edit(meta):
        return {**meta, "config": json.dumps({**json.loads(meta["config"]), **changes})}
    return edit


#: Metadata damage a single bit flip can cause (found by flipping every header bit of a saved file;
#: before the hash covered the metadata, the first two loaded silently with another scale/dropout
#: and the last two escaped as a bare KeyError / JSONDecodeError).
METADATA_DAMAGE = {
    "gamma-1.0-to-1.1": _edit_config(gamma=1.1),          # '0' -> '1' is one bit: a different scale
    "dropout-0.0-to-0.1": _edit_config(dropout=0.1),      # dropout switched on
    "config-key-damaged": lambda m: {("cpnfig" if k == "config" else k): v for k, v in m.items()},
    "config-json-damaged": lambda m: {**m, "config": m["config"].replace(":", ";", 1)},
}


@pytest.mark.parametrize("damage", sorted(METADATA_DAMAGE))
def test_damaged_metadata_is_refused_with_a_clear_error(tmp_path, damage):
    path, _ = _saved(tmp_path)
    _rewrite_metadata(path, METADATA_DAMAGE[damage])
    with pytest.raises(ValueError, match="^load_adapter: "):
        load_adapter(loop.Net(), tmp_path)


def test_undamaged_metadata_rewrite_still_loads(tmp_path):
    """The control for the test above: rewriting the same metadata is not refused."""
    path, out = _saved(tmp_path)
    _rewrite_metadata(path, lambda m: m)
    assert torch.equal(load_adapter(loop.Net(), tmp_path)(torch.ones(2, 16)), out)


def _forge(path: Path, edit_tensors=lambda t: t, edit_config=None) -> None:
    """Rewrite an adapter file with edited tensors and/or config and a content hash that fits them."""
    from safetensors.torch import safe_open, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = edit_tensors(tensors)
    if edit_config is not None:
        meta = _edit_config(**edit_config)(meta)
    save_file(tensors, str(path), metadata={**meta, "sha256": _forged_hash(tensors, meta)})


FORGERIES = {
    "extra tensor": (lambda t: {**t, "layers.0.proj.adapter_x": torch.zeros(2)}, None, "has no counterpart"),
    "missing tensor": (lambda t: dict(list(t.items())[1:]), None, "trained tensors missing"),
    "wrong shape": (lambda t: {k: v[..., :-1].contiguous() for k, v in t.items()}, None, "has shape"),
    "NaN": (lambda t: {k: v.fill_(float("nan")) for k, v in t.items()}, None, "non-finite"),
    # a config asking for a bank far larger than the file's tensor: refused on the meta device, before
    # anything of that size is allocated
    "huge core bank": (lambda t: t, dict(core_bank=50_000_000), r"has shape \(2.*in the file, \(50000000"),
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_a_refused_file_leaves_a_plain_model_untouched(tmp_path, forgery):
    """With a valid hash over forged content, a model without adapters is refused before inject:
    no adapters, no frozen base parameters, nothing allocated for a crafted config."""
    if forgery == "huge core bank":  # a tensor-embedding adapter (its LM bank is trained, so in the file)
        source = inject(loop.Net(), TiedLoRAConfig(rank=2, preset="tensor_embed", core_bank=2))
    else:
        source = loop.version(0)
    save_adapter(source, tmp_path)
    edit_tensors, edit_config, msg = FORGERIES[forgery]
    _forge(tmp_path / ADAPTER_FILE, edit_tensors, edit_config)
    model = loop.Net()
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=msg):
        load_adapter(model, tmp_path)
    assert not hasattr(model, "tiedlora")
    after = {n: (p.detach(), p.requires_grad) for n, p in model.named_parameters()}
    assert after.keys() == before.keys() and all(
        torch.equal(after[n][0], before[n][0]) and after[n][1] == before[n][1] for n in before)


def _adam_saved(tmp_path):
    model = loop.version(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(torch.randn(4, 16)).square().mean().backward()
    opt.step()
    save_adapter(model, tmp_path, optimizer=opt)
    fresh = loop.version(1, same_config=True)
    return fresh, torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-3)


def _forge_optimizer(path: Path, edit_tensors=lambda t: t, edit_groups=lambda g: g) -> None:
    from safetensors.torch import safe_open, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = edit_tensors(tensors)
    groups = json.dumps(edit_groups(json.loads(meta["param_groups"])))
    meta = {**meta, "param_groups": groups,
            "sha256": loop.ckpt.content_hash(tensors, groups, meta.get("adapter_sha256", ""))}
    save_file(tensors, str(path), metadata=meta)


def _first_state(t, suffix):
    return next(k for k in sorted(t) if k.endswith(suffix))


OPTIMIZER_FORGERIES = {
    "hash": (lambda t: t, lambda g: g, "sha256 mismatch", False),
    "moment shape": (lambda t: {**t, _first_state(t, "/exp_avg"): torch.zeros(1)}, lambda g: g, "is \\(1,\\)", True),
    "moment NaN": (lambda t: {**t, _first_state(t, "/exp_avg_sq"): torch.full_like(t[_first_state(t, "/exp_avg_sq")],
                                                                                    float("nan"))},
                   lambda g: g, "non-finite", True),
    "unknown parameter": (lambda t: {**t, "nowhere.A/exp_avg": torch.zeros(2)}, lambda g: g, "names no parameter", True),
    "lr a string": (lambda t: t, lambda g: [{**g[0], "lr": "evil"}], "hyperparameter 'lr'", True),
    "groups not dicts": (lambda t: t, lambda g: [1], "unreadable parameter groups", True),
}


@pytest.mark.parametrize("forgery", sorted(OPTIMIZER_FORGERIES))
def test_a_refused_optimizer_file_changes_neither_the_adapter_nor_the_optimizer(tmp_path, forgery):
    """The optimizer file is read and checked whole before the adapter is copied: a bad one (a broken
    hash; a forged state consistent with its hash: wrong shapes, NaN moments, unknown parameters,
    hyperparameters of the wrong type) leaves the model's adapter and the optimizer as they were."""
    model, opt = _adam_saved(tmp_path)
    edit_tensors, edit_groups, msg, rehash = OPTIMIZER_FORGERIES[forgery]
    path = tmp_path / OPTIMIZER_FILE
    if rehash:
        _forge_optimizer(path, edit_tensors, edit_groups)
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    before = {n: p.detach().clone() for n, p in adapter_named_parameters(model)}
    with pytest.raises(ValueError, match=msg):
        load_adapter(model, tmp_path, optimizer=opt)
    assert all(torch.equal(p, before[n]) for n, p in adapter_named_parameters(model))
    assert not opt.state and opt.param_groups[0]["lr"] == 1e-3


def test_an_optimizer_needs_a_model_with_adapters(tmp_path):
    _adam_saved(tmp_path)
    model = loop.Net()
    with pytest.raises(ValueError, match="optimizer= needs a model that has its adapters already"):
        load_adapter(model, tmp_path, optimizer=torch.optim.Adam(model.parameters()))
    assert not hasattr(model, "tiedlora")


@pytest.mark.parametrize("table", [[[1], []], None, [["a", "b", "1", 2]], [["a"]]], ids=str)
def test_a_malformed_layer_table_with_a_valid_hash_is_refused_clearly(tmp_path, table):
    from safetensors.torch import safe_open, save_file

    path, _ = _saved(tmp_path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = {**meta, "layers": json.dumps(table)}
    save_file(tensors, str(path), metadata={**meta, "sha256": _forged_hash(tensors, meta)})
    with pytest.raises(ValueError, match=r"unreadable config .*layer table"):
        load_adapter(loop.Net(), tmp_path)
