"""Model, pretraining, adaptation and evaluation for the demo.

Losses are cross entropy in bits per token (nats / ln 2), as the write-up "Parameter Efficient
Fine Tuning Ideas" reports them (see docs/MATH.md, "Sources"). On the task, the loss covers the
response tokens only (the worked solution and ``Answer: <int>`` plus the end token); the question
is context and is not scored, as in the usual completion-only fine-tuning.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..bases import keep_standard_cpu_layout
from ..config import TiedLoRAConfig
from ..integrations import expected_trainable_parameters, inject, trainable_parameters
from ..integrations.inject import find_targets
from .data import WordProblem, exact_match, extract_answer

LN2 = math.log(2.0)
IGNORE = -100


def build_tiny_llama(vocab_size: int, *, hidden: int = 96, layers: int = 3, heads: int = 4,
                     intermediate: int = 256, max_positions: int = 256, seed: int = 0) -> nn.Module:
    """A small LLaMA built from a ``LlamaConfig`` (no download), initialised under ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def quantize_model(model: nn.Module, bits: str, device) -> nn.Module:
    """``model`` reloaded with bitsandbytes linear layers, 4-bit NF4 (fp32 compute) or 8-bit, as
    ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` loads a model (QLoRA-style)."""
    import tempfile

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise SystemExit("tiedlora demo: --quantize needs bitsandbytes: pip install -e '.[quant]'") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == "4bit":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        cfg = BitsAndBytesConfig(load_in_8bit=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=cfg, device_map={"": str(device)},
                                                         dtype=torch.float32)
    for module in quantized.modules():
        keep_standard_cpu_layout(module)
    return quantized


class Progress:
    """Progress of one training phase, on stderr.

    On a terminal: a tqdm bar. Elsewhere (a log file, CI, a pipe; tqdm would stay silent there):
    a plain line at the first step, then at most every ``every`` seconds, and at the last step,
    so a log shows the run is alive. ``enabled=False`` shows neither.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, every: float = 10.0):
        self.total, self.desc, self.every = total, desc, every
        self.stream = sys.stderr
        self.n = 0
        self.t0 = time.perf_counter()
        self.last: Optional[float] = None
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = (tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=self.stream)
                    if enabled and is_tty else None)
        self.lines = enabled and not is_tty

    def update(self, bits: float) -> None:
        """One step done, with its loss in bits per token."""
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(bits=f"{bits:.3f}")
        elif self.lines:
            now = time.perf_counter()
            if self.last is None or now - self.last >= self.every or self.n == self.total:
                self.last = now
                print(f"tiedlora demo: {self.desc}: step {self.n}/{self.total}, loss {bits:.3f} bits/token, "
                      f"{now - self.t0:.0f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _lr_lambda(total: int, warmup_frac: float = 0.05, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up (at least 2 steps: one would start at the peak), then cosine decay to ``floor``
    of the peak."""
    warm = max(2, int(total * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return f


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def lm_loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross entropy in nats over positions with a label, number of them)."""
    logits = _logits(model, ids)[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((target != IGNORE).sum())


# ---------------------------------------------------------------------------------------------------------
# Base pretraining


def pretrain(model: nn.Module, token_stream: torch.Tensor, *, steps: int, batch_size: int, seq_len: int,
             lr: float, seed: int, device: torch.device, progress: bool = True,
             log_every: float = 10.0) -> list[float]:
    """Train every weight of ``model`` on random ``seq_len`` windows of ``token_stream`` (AdamW,
    warm-up + cosine). Returns the per-step loss in bits per token. ``progress`` / ``log_every``:
    see :class:`Progress`."""
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    losses = []
    bar = Progress(steps, "pretrain base", progress, log_every)
    for _ in range(steps):
        starts = torch.randint(0, len(token_stream) - seq_len - 1, (batch_size,), generator=gen)
        ids = torch.stack([token_stream[s:s + seq_len + 1] for s in starts.tolist()]).to(device)
        loss_sum, n = lm_loss_sum(model, ids, ids)
        loss = loss_sum / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item() / LN2)
        bar.update(losses[-1])
    bar.close()
    return losses


# ---------------------------------------------------------------------------------------------------------
# Task data


@dataclass
class EncodedTask:
    """Token ids of each problem (``bos? + prompt + response + eos?``), the index where the
    response starts, and the prompts alone (for generation)."""

    ids: list[list[int]]
    response_start: list[int]
    prompt_ids: list[list[int]]
    answers: list[int]
    max_response: int


def encode_task(problems: Sequence[WordProblem], tok) -> EncodedTask:
    ids, starts, prompts, answers = [], [], [], []
    bos = [tok.bos_id] if tok.bos_id is not None else []
    eos = [tok.eos_id] if tok.eos_id is not None else []
    max_resp = 0
    for p in problems:
        prompt = bos + tok.encode(p.prompt)
        resp = tok.encode(p.response) + eos
        ids.append(prompt + resp)
        starts.append(len(prompt))
        prompts.append(prompt)
        answers.append(p.answer)
        max_resp = max(max_resp, len(resp))
    return EncodedTask(ids, starts, prompts, answers, max_resp)


def task_batch(task: EncodedTask, index: Sequence[int], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels); labels are -100 on the prompt and the padding."""
    width = max(len(task.ids[i]) for i in index)
    ids = torch.full((len(index), width), pad_id, dtype=torch.long)
    labels = torch.full((len(index), width), IGNORE, dtype=torch.long)
    for row, i in enumerate(index):
        seq = torch.tensor(task.ids[i], dtype=torch.long)
        ids[row, :len(seq)] = seq
        labels[row, task.response_start[i]:len(seq)] = seq[task.response_start[i]:]
    return ids.to(device), labels.to(device)


@torch.no_grad()
def task_loss_bits(model: nn.Module, task: EncodedTask, pad_id: int, device, batch_size: int = 128,
                   limit: Optional[int] = None) -> float:
    """Mean response-token loss in bits per token over the first ``limit`` problems."""
    was_training = model.training
    model.eval()
    n_items = len(task.ids) if limit is None else min(limit, len(task.ids))
    total, count = 0.0, 0
    for s in range(0, n_items, batch_size):
        ids, labels = task_batch(task, range(s, min(s + batch_size, n_items)), pad_id, device)
        loss_sum, n = lm_loss_sum(model, ids, labels)
        total += loss_sum.item()
        count += n
    model.train(was_training)
    return total / max(count, 1) / LN2


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(prompts), longest) int64 on ``device``: each prompt
    right-aligned after ``pad_id`` padding, as ``generate`` wants a batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int,
                    stop_ids: Sequence[int], device, batch_size: int = 256) -> list[list[int]]:
    """Greedy continuation of each prompt with ``model.generate`` (left-padded batches with an
    attention mask, KV cache). Returns the generated ids without the prompt, cut after the first
    of ``stop_ids``."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    stop = set(stop_ids)
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s:s + batch_size], pad_id, device)
        width = ids.shape[1]
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=0, pad_token_id=pad_id,
                             eos_token_id=list(stop) or None, num_beams=1)
        for row in gen[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
            out.append(row[:cut])
    model.train(was_training)
    return out


def task_accuracy(model: nn.Module, task: EncodedTask, tok, device, *, limit: Optional[int] = None,
                  batch_size: int = 256) -> tuple[float, list[Optional[int]]]:
    """Exact match of the integer after ``Answer:`` in the greedy continuation of each prompt."""
    n_items = len(task.prompt_ids) if limit is None else min(limit, len(task.prompt_ids))
    stops = [tok.eos_id] if tok.eos_id is not None else []
    gens = greedy_generate(model, task.prompt_ids[:n_items], max_new_tokens=task.max_response + 2,
                           pad_id=tok.pad_id, stop_ids=stops, device=device, batch_size=batch_size)
    preds = [extract_answer(tok.decode(g)) for g in gens]
    return exact_match(preds, task.answers[:n_items]), preds


# ---------------------------------------------------------------------------------------------------------
# Adaptation


@dataclass
class AdaptResult:
    preset: str
    rank: int
    lr: float
    trainable: int
    initial_train_bits: float
    final_train_bits: float
    test_bits: float
    accuracy: float
    step_bits: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_test_bits: list[float] = field(default_factory=list)
    seconds: float = 0.0


def lora_parameter_count(model: nn.Module, rank: int, target_modules="all-linear") -> int:
    """Trainable parameters LoRA would have at ``rank`` on ``model`` (Table 1's formula)."""
    cfg = TiedLoRAConfig(rank=rank, preset="lora", target_modules=target_modules)
    return expected_trainable_parameters(cfg, [(t.kind, t.in_features, t.out_features)
                                               for t in find_targets(model, cfg)])


def train_adapters(model: nn.Module, task: EncodedTask, batches: Sequence[Sequence[int]], pad_id: int, *, lr: float,
                   device, progress: "Progress", on_step: Optional[Callable[[int, float], None]] = None) -> None:
    """Train ``model``'s trainable tensors (its adapters) in place on ``task``, one AdamW step (warm-up
    + cosine schedule, gradient norm clipped at 1) per batch of task indices; ``on_step(step, bits)``
    after each step with the step's loss in bits per token."""
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(len(batches)))
    for step, index in enumerate(batches):
        ids, labels = task_batch(task, index, pad_id, device)
        loss_sum, n = lm_loss_sum(model, ids, labels)
        loss = loss_sum / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bits = loss.item() / LN2
        if on_step is not None:
            on_step(step, bits)
        progress.update(bits)
    progress.close()


def adapt(base: nn.Module, config: TiedLoRAConfig, *, train: EncodedTask, test: EncodedTask, tok,
          batches: Sequence[Sequence[int]], lr: float, device, eval_train_limit: int, eval_test_limit: int,
          acc_limit: int, eval_every: int, initial_train_bits: float, progress: bool = True,
          log_every: float = 10.0, desc: Optional[str] = None) -> AdaptResult:
    """Copy ``base``, inject ``config``'s adapters, train them on ``batches`` (lists of train
    indices, the same for every preset) and evaluate. ``progress`` / ``log_every`` / ``desc``
    (the phase's name in progress lines): see :class:`Progress`."""
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    inject(model, config)
    res = AdaptResult(config.preset, config.rank, lr, trainable_parameters(model)["total"],
                      initial_train_bits, math.nan, math.nan, math.nan)

    def evaluate(step: int, bits: float) -> None:
        res.step_bits.append(bits)
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == len(batches)):
            res.eval_steps.append(step + 1)
            res.eval_test_bits.append(task_loss_bits(model, test, tok.pad_id, device, limit=eval_test_limit))

    train_adapters(model, train, batches, tok.pad_id, lr=lr, device=device, on_step=evaluate,
                   progress=Progress(len(batches), desc or f"{config.preset} r={config.rank}", progress, log_every))
    res.final_train_bits = task_loss_bits(model, train, tok.pad_id, device, limit=eval_train_limit)
    res.test_bits = (res.eval_test_bits[-1] if res.eval_test_bits
                     else task_loss_bits(model, test, tok.pad_id, device, limit=eval_test_limit))
    res.accuracy, _ = task_accuracy(model, test, tok, device, limit=acc_limit)
    res.seconds = time.perf_counter() - t0
    return res
