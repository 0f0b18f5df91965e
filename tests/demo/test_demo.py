"""The demo: task generator, metric, and end-to-end runs in --quick mode (built-in model and --model)."""

import json
import random

import pytest
import torch

from tiedlora_kernels import PRESETS, TiedLoRAConfig, inject, trainable_parameters
from tiedlora_kernels.__main__ import main as cli_main
from tiedlora_kernels.demo import data
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
