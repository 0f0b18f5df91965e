"""The demo: task generator, metric, end-to-end runs in --quick mode (built-in model and --model),
and keeping its work (results after every preset, resume, Ctrl-C / SIGTERM, progress in logs)."""

import json
import os
import random
import re
import shutil
import signal

from pathlib import Path

import pytest
import torch

from tiedlora_kernels import PRESETS, TiedLoRAConfig, inject, trainable_parameters
from tiedlora_kernels.__main__ import main as cli_main
from tiedlora_kernels.demo import data, report
from tiedlora_kernels.demo import run as demo_run
from tiedlora_kernels.demo.run import main as demo_main
from tiedlora_kernels.demo.train import build_tiny_llama

pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------------------
# Generators and metric


def _replay(problem: data.WordProblem) -> int:
    """Recompute the answer from the worked solution, checking every equation's arithmetic."""
    equations = problem.response.split("\n")[0].rstrip(".").split(". ")
    value = None
    for eq in equations:
        lhs, rhs = eq.split(" = ")
        a, op, b = lhs.split(" ")
        a, b, rhs = int(a), int(b), int(rhs)
        assert value is None or a == value, problem
        assert rhs == (a + b if op == "+" else a - b), problem
        assert 1 <= b <= data.MAX_OPERAND and 0 <= rhs <= 2 * data.MAX_OPERAND, problem
        value = rhs
    return value


def test_word_problem_answers_are_correct():
    problems = data.word_problems(500, seed=3)
    for p in problems:
        assert _replay(p) == p.answer
        assert data.extract_answer(p.response) == p.answer
        start = int(p.prompt.split(" has ")[1].split(" ")[0])
        assert p.response.startswith(f"{start} "), p
        assert p.prompt.startswith("Question: ") and p.prompt.endswith("?\n")
    steps = {p.response.count("=") for p in problems}
    assert steps == {1, 2}


def test_generators_are_deterministic_and_seeded():
    assert data.word_problems(50, seed=1) == data.word_problems(50, seed=1)
    assert data.word_problems(50, seed=1) != data.word_problems(50, seed=2)
    assert data.word_problems(50, seed=1, split="train") != data.word_problems(50, seed=1, split="test")
    assert data.base_corpus(5000, seed=0) == data.base_corpus(5000, seed=0)
    assert data.base_corpus(5000, seed=0) != data.base_corpus(5000, seed=1)


def test_base_corpus_facts_are_correct_and_format_free():
    text = data.base_corpus(50_000, seed=0)
    assert 50_000 <= len(text) < 51_000
    for tag in ("Question:", "Answer:"):
        assert tag not in text
    import re
    facts = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text)
    assert len(facts) > 500
    for a, op, b, c in facts:
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_char_tokenizer_roundtrip_covers_corpora():
    tok = data.CharTokenizer()
    text = data.base_corpus(20_000) + "".join(p.text for p in data.word_problems(100))
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.bos_id, *tok.encode("ab"), tok.eos_id, tok.pad_id]) == "ab"
    with pytest.raises(ValueError, match="outside the demo alphabet"):
        tok.encode("é")


@pytest.mark.parametrize("text, expected", [
    ("3 + 5 = 8.\nAnswer: 8\n", 8), ("Answer:12", 12), ("Answer: -3", -3), ("Answer: 4\nAnswer: 5", 4),
    ("3 + 5 = 8.", None), ("Answer: x", None), ("", None),
])
def test_extract_answer(text, expected):
    assert data.extract_answer(text) == expected


def test_exact_match():
    assert data.exact_match([8, None, 3, 4], [8, 0, 2, 4]) == 0.5
    assert data.exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        data.exact_match([1], [1, 2])


# ---------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_quick")
    results = demo_main(["--quick", "--out", str(out), "--no-progress", "--device", "cpu"])
    return out, results


def test_quick_run_writes_artefacts(quick_run):
    out, results = quick_run
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "results.json").read_text())
    assert [r["preset"] for r in saved["rows"]] == list(PRESETS)
    md = (out / "results.md").read_text()
    for preset in PRESETS:
        assert f"| {preset} | 8 |" in md


def test_quick_run_reduces_loss_for_every_preset(quick_run):
    _, results = quick_run
    for r in results["rows"]:
        assert r["final_train_bits"] < r["initial_train_bits"], r["preset"]
        assert r["test_bits"] < results["baseline"]["test_bits"], r["preset"]
        assert len(r["step_bits"]) == results["settings"]["steps"]
        assert 0.0 <= r["accuracy"] <= 1.0


def test_quick_run_parameter_counts(quick_run):
    _, results = quick_run
    rows = {r["preset"]: r for r in results["rows"]}
    assert rows["lora"]["p_of_lora"] == 100.0
    tok = data.CharTokenizer()
    for preset, r in rows.items():
        model = build_tiny_llama(tok.vocab_size, hidden=64, layers=2, intermediate=172)
        inject(model, TiedLoRAConfig(rank=8, preset=preset))
        assert r["trainable"] == trainable_parameters(model)["total"], preset
        assert r["p_of_lora"] == pytest.approx(100.0 * r["trainable"] / rows["lora"]["trainable"])


def test_quick_run_is_deterministic(quick_run, tmp_path):
    _, first = quick_run
    again = demo_main(["--quick", "--presets", "lora,tl6", "--out", str(tmp_path), "--no-progress",
                       "--no-plot", "--device", "cpu"])
    assert not (tmp_path / "curves.png").exists()
    rows = {r["preset"]: r for r in first["rows"]}
    for r in again["rows"]:
        ref = rows[r["preset"]]
        for key in ("trainable", "initial_train_bits", "final_train_bits", "test_bits", "accuracy", "step_bits"):
            assert r[key] == ref[key], (r["preset"], key)


def test_cli_entry_point(tmp_path, capsys):
    assert cli_main(["demo", "--quick", "--presets", "vera", "--ranks", "2", "--steps", "3", "--base-steps", "2",
                     "--out", str(tmp_path), "--no-plot", "--no-progress", "--device", "cpu"]) == 0
    assert "vera" in capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["preset"], r["rank"]) for r in saved["rows"]] == [("vera", 2)]
    assert cli_main([]) == 2
    with pytest.raises(SystemExit):
        cli_main(["demo", "--presets", "nope", "--out", str(tmp_path)])


@pytest.mark.parametrize("flag", ["--n-test", "--n-train"])
def test_empty_train_or_test_sets_are_refused_before_training(flag, tmp_path, monkeypatch):
    """--n-test 0 reported a perfect 0.000 bits/token for every row (an empty mean)."""
    monkeypatch.setattr(demo_run, "pretrain", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit, match="--n-train and --n-test must be >= 1"):
        demo_main(["--quick", flag, "0", "--out", str(tmp_path), "--no-progress", "--device", "cpu"])


@pytest.mark.parametrize("flags,message", [
    (["--gamma", "0"], "lora r=2: TiedLoRAConfig.gamma must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite positive number"),
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--base-lr", "0"], "--base-lr must be a finite positive number"),
    (["--ranks", "999"], "lora r=999: inject: rank=999 is larger than layer"),
], ids=["gamma", "lr", "lr-inf", "base-lr", "rank"])
def test_bad_settings_are_refused_before_pretraining(flags, message, tmp_path, monkeypatch):
    """A bad --gamma, learning rate or a rank the built-in model's layers cannot take: refused at once (they
    were found only after pretraining the base model, minutes, and writing its results)."""
    monkeypatch.setattr(demo_run, "pretrain", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(SystemExit, match=re.escape(message)):
        demo_main(["--quick", "--presets", "lora", "--ranks", "2", *flags, "--out", str(tmp_path), "--no-progress",
                   "--device", "cpu"])
    assert not list(tmp_path.iterdir())


def test_one_target_module_name_and_repeated_presets_and_ranks(tmp_path):
    """A single name in --target-modules is a name (as in a comma-separated list), not a regex over
    full paths that matches nothing; a preset or rank given twice is trained once."""
    results = demo_main(["--quick", "--presets", "lora,lora", "--ranks", "2,2", "--target-modules", "q_proj",
                         "--steps", "2", "--base-steps", "2", "--out", str(tmp_path), "--no-plot", "--no-progress",
                         "--device", "cpu"])
    assert results["settings"]["target_modules"] == ["q_proj"] and results["settings"]["ranks"] == [2]
    assert [(r["preset"], r["rank"]) for r in results["rows"]] == [("lora", 2)]
    model = build_tiny_llama(data.CharTokenizer().vocab_size, hidden=64, layers=2, intermediate=172)
    inject(model, TiedLoRAConfig(rank=2, preset="lora", target_modules=["q_proj"]))
    assert results["rows"][0]["trainable"] == trainable_parameters(model)["total"]


def test_commit_is_not_taken_from_a_repository_around_an_installed_copy(tmp_path, monkeypatch):
    """An installed copy inside someone's git repository records no commit, not that repository's."""
    import subprocess

    repo = tmp_path / "project"
    module = repo / "venv" / "site-packages" / "tiedlora_kernels" / "demo" / "run.py"
    module.parent.mkdir(parents=True)
    module.write_text("")
    for cmd in (["init", "-q"], ["-c", "user.name=a", "-c", "user.email=a@b", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)
    monkeypatch.setattr(demo_run, "__file__", str(module))
    assert demo_run._git_commit() is None


def _save_pretrained_char_model(path):
    """A tiny LLaMA and a character-level fast tokenizer, saved the way from_pretrained reads them."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = ["<pad>", "<bos>", "<eos>", "<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    assert tok.decode(tok("Answer: 12\n", add_special_tokens=False)["input_ids"]) == "Answer: 12\n"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(chars), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_model_flag_loads_a_saved_pretrained_model(tmp_path):
    model_dir = tmp_path / "tiny-llama"
    _save_pretrained_char_model(model_dir)
    out = tmp_path / "out"
    results = demo_main(["--model", str(model_dir), "--quick", "--presets", "lora,tl6", "--out", str(out),
                         "--no-progress", "--device", "cpu"])
    assert results["settings"]["model"] == str(model_dir)
    assert results["settings"]["base_steps"] == 0
    assert results["base_pretrain_bits"] == []
    assert [r["preset"] for r in results["rows"]] == ["lora", "tl6"]
    for r in results["rows"]:
        assert r["final_train_bits"] < r["initial_train_bits"], r["preset"]
    assert (out / "results.json").exists() and (out / "results.md").exists()


def test_task_sampling_is_independent_of_global_rng():
    random.seed(123)
    torch.manual_seed(123)
    a = data.word_problems(10, seed=0)
    random.seed(7)
    torch.manual_seed(7)
    assert data.word_problems(10, seed=0) == a


# ---------------------------------------------------------------------------------------------------------
# Keeping the work: incremental results, interrupts, resume, progress lines

QUICK3 = ["--quick", "--presets", "lora,vera,tl6", "--no-progress", "--device", "cpu"]
NUMBERS = ("trainable", "initial_train_bits", "final_train_bits", "test_bits", "accuracy", "step_bits",
           "eval_test_bits")


def _spy_adapt(monkeypatch, before=None):
    """Wrap the demo's ``adapt``: record the presets it trains, call ``before(preset)`` first."""
    calls = []
    real = demo_run.adapt

    def adapt(base, config, **kw):
        if before is not None:
            before(config.preset)
        calls.append(config.preset)
        return real(base, config, **kw)

    monkeypatch.setattr(demo_run, "adapt", adapt)
    return calls


def test_results_are_written_after_every_preset(tmp_path, monkeypatch):
    seen = []

    def before(preset):
        saved = json.loads((tmp_path / "results.json").read_text())
        seen.append((saved["status"], [r["preset"] for r in saved["rows"]]))

    _spy_adapt(monkeypatch, before)
    demo_main(QUICK3 + ["--out", str(tmp_path), "--no-plot"])
    assert seen == [("partial", []), ("partial", ["lora"]), ("partial", ["lora", "vera"])]
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "complete"


def test_interrupt_keeps_work_and_rerun_resumes_with_same_numbers(tmp_path, monkeypatch, quick_run):
    def ctrl_c_at_vera(preset):
        if preset == "vera":
            raise KeyboardInterrupt

    _spy_adapt(monkeypatch, ctrl_c_at_vera)
    with pytest.raises(SystemExit) as exc:
        demo_main(QUICK3 + ["--out", str(tmp_path)])
    assert exc.value.code == 130
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "interrupted"
    assert [r["preset"] for r in saved["rows"]] == ["lora"]
    assert saved["missing"] == ["vera r=8", "tl6 r=8"]
    md = (tmp_path / "results.md").read_text()
    assert "Interrupted" in md and "| lora | 8 |" in md and "| vera |" not in md
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

    # The rerun trains only what is missing, reuses the saved base model, and gets the numbers an
    # uninterrupted run gets.
    monkeypatch.undo()
    calls = _spy_adapt(monkeypatch)

    def no_pretraining(*a, **k):
        raise AssertionError("the resumed run should load the saved base model, not pretrain again")

    monkeypatch.setattr(demo_run, "pretrain", no_pretraining)
    results = demo_main(QUICK3 + ["--out", str(tmp_path)])
    assert calls == ["vera", "tl6"]
    assert results["status"] == "complete" and results["missing"] == []
    assert results["sessions"] == 2
    assert [r["preset"] for r in results["rows"]] == ["lora", "vera", "tl6"]
    reference = {r["preset"]: r for r in quick_run[1]["rows"]}
    for r in results["rows"]:
        for key in NUMBERS:
            assert r[key] == reference[r["preset"]][key], (r["preset"], key)
    assert results["baseline"] == quick_run[1]["baseline"]
    assert results["base_pretrain_bits"] == quick_run[1]["base_pretrain_bits"]

    # Everything done: a third run trains nothing; --fresh starts over.
    calls.clear()
    demo_main(QUICK3 + ["--out", str(tmp_path), "--no-plot"])
    assert calls == []
    monkeypatch.undo()
    calls = _spy_adapt(monkeypatch)
    demo_main(QUICK3 + ["--out", str(tmp_path), "--no-plot", "--fresh", "--presets", "vera"])
    assert calls == ["vera"]


def test_sigterm_keeps_work(tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)

    def term_at_vera(preset):
        if preset == "vera":
            os.kill(os.getpid(), signal.SIGTERM)

    _spy_adapt(monkeypatch, term_at_vera)
    with pytest.raises(SystemExit) as exc:
        demo_main(QUICK3 + ["--out", str(tmp_path), "--no-plot"])
    assert exc.value.code == 128 + signal.SIGTERM
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "interrupted"
    assert [r["preset"] for r in saved["rows"]] == ["lora"]
    assert signal.getsignal(signal.SIGTERM) == before


def test_other_settings_do_not_resume(tmp_path, monkeypatch, capsys):
    args = ["--quick", "--presets", "vera", "--base-steps", "2", "--no-progress", "--no-plot", "--device", "cpu",
            "--out", str(tmp_path)]
    demo_main(args + ["--steps", "2"])
    calls = _spy_adapt(monkeypatch)
    results = demo_main(args + ["--steps", "3"])
    assert calls == ["vera"]
    assert len(results["rows"][0]["step_bits"]) == 3
    assert "not resuming" in capsys.readouterr().err


def test_progress_lines_in_logs(tmp_path, capsys):
    # capsys's stderr is not a terminal, as in a log file: plain lines instead of a tqdm bar.
    base = ["--quick", "--presets", "lora", "--base-steps", "2", "--steps", "3", "--no-plot", "--device", "cpu"]
    demo_main(base + ["--out", str(tmp_path / "a"), "--log-every", "0"])
    err = capsys.readouterr().err
    assert "pretrain base: step 2/2" in err
    for step in (1, 2, 3):
        assert f"[1/1] lora r=8: step {step}/3, loss " in err
    # A long interval still shows the first and the last step.
    demo_main(base + ["--out", str(tmp_path / "b"), "--log-every", "1000"])
    err = capsys.readouterr().err
    assert "step 1/3" in err and "step 3/3" in err and "step 2/3" not in err
    demo_main(base + ["--out", str(tmp_path / "c"), "--no-progress"])
    assert "step 1/3" not in capsys.readouterr().err


def test_results_record_versions(quick_run):
    out, results = quick_run
    env = json.loads((out / "results.json").read_text())["environment"]
    for key in ("torch", "transformers", "python", "platform", "tiedlora_kernels", "device_name", "backend"):
        assert env[key], key
    md = (out / "results.md").read_text()
    assert f"torch {env['torch']}" in md and f"transformers {env['transformers']}" in md


def test_replot_redraws_from_results_json(quick_run, tmp_path, monkeypatch):
    out, _ = quick_run
    shutil.copy(out / "results.json", tmp_path / "results.json")
    before = (tmp_path / "results.json").read_bytes()
    monkeypatch.setattr(demo_run, "adapt", None)  # --replot must not train
    demo_main(["--replot", "--out", str(tmp_path)])
    assert (tmp_path / "results.json").read_bytes() == before
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.md").read_text() == (out / "results.md").read_text()


def test_committed_demo_results_replot():
    """docs/demo/results.json (the README's table) must stay readable by the current report code."""
    results = json.loads((Path(__file__).resolve().parents[2] / "docs/demo/results.json").read_text())
    md = report.markdown_report(results)
    for r in results["rows"]:
        assert f"| {r['preset']} | {r['rank']} |" in md


@pytest.mark.parametrize("lo, hi, expected", [
    (0.85, 3.3, [0.9, 1, 1.2, 1.5, 2, 2.5, 3]),
    (1200, 90000, [2000, 3000, 5000, 10000, 20000, 30000, 50000]),
    (4.4, 5.5, [5]),
])
def test_log_ticks_are_round_numbers(lo, hi, expected):
    assert report._log_ticks(lo, hi) == pytest.approx(expected)
    assert [report._plain(t) for t in report._log_ticks(1200, 90000)][:2] == ["2,000", "3,000"]


def test_quantized_base_qlora_style(tmp_path):
    """--quantize 4bit adapts a bitsandbytes NF4 copy of the pretrained base (on the CPU too)."""
    pytest.importorskip("bitsandbytes")
    results = demo_main(["--quick", "--quantize", "4bit", "--presets", "tl6", "--steps", "6", "--out",
                         str(tmp_path), "--no-progress", "--no-plot", "--device", "cpu"])
    assert results["settings"]["quantize"] == "4bit"
    assert "quantized to 4bit" in results["settings"]["model_desc"]
    (row,) = results["rows"]
    assert row["preset"] == "tl6" and row["final_train_bits"] < results["baseline"]["train_bits"]
