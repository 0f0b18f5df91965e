"""The demo's embedded corpora, generated deterministically in code (no files, no downloads, licence-clean).

Two corpora, deliberately different:

- the *base corpus*: plain English-like sentences about people, things and places, plus simple
  number facts written as ``3 + 5 = 8.``. It stands in for pretraining text: it teaches the
  language, the names and the arithmetic facts, but never the question/answer format.
- the *task*: grade-school arithmetic word problems in the style of GSM8K (one or two steps, a
  worked solution, then ``Answer: <int>``), generated with known answers so the metric (exact
  match of the final integer) is exact.

A :class:`CharTokenizer` covers every character the generators emit.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

NAMES = ("Tom", "Mia", "Sam", "Ava", "Leo", "Zoe", "Ben", "Ivy", "Max", "Lily", "Noah", "Emma", "Jack", "Ruby",
         "Owen", "Nora")
SHE = {"Mia", "Ava", "Zoe", "Ivy", "Lily", "Emma", "Ruby", "Nora"}
#: (singular, plural)
OBJECTS = (("apple", "apples"), ("pear", "pears"), ("book", "books"), ("pencil", "pencils"), ("marble", "marbles"),
           ("cookie", "cookies"), ("shell", "shells"), ("sticker", "stickers"), ("egg", "eggs"), ("card", "cards"),
           ("ball", "balls"), ("cup", "cups"))
PLACES = ("park", "shop", "school", "beach", "farm", "library", "garden", "market")
ADJECTIVES = ("red", "big", "small", "green", "old", "new", "blue", "soft")

#: The largest operand in word problems and number facts (answers stay in 0 .. 2 * MAX_OPERAND).
MAX_OPERAND = 9


def _pronoun(name: str) -> str:
    return "She" if name in SHE else "He"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _count(n: int, obj: tuple[str, str]) -> str:
    return f"{n} {obj[0] if n == 1 else obj[1]}"


# ---------------------------------------------------------------------------------------------------------
# Base corpus


def _base_sentence(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    kind = rng.randrange(8)
    if kind == 0:
        return f"{name} has {_count(rng.randint(1, MAX_OPERAND), obj)}."
    if kind == 1:
        return f"{name} and {other} go to the {rng.choice(PLACES)}."
    if kind == 2:
        return f"{name} sees {_a(rng.choice(ADJECTIVES))} {obj[0]} at the {rng.choice(PLACES)}."
    if kind == 3:
        return f"The {obj[1]} are {rng.choice(ADJECTIVES)}."
    if kind == 4:
        return f"{_pronoun(name)} likes {obj[1]} and {rng.choice(OBJECTS)[1]}."
    if kind == 5:
        return f"{name} gives {_a(obj[0])} to {other}."
    if kind == 6:
        return f"There is {_a(rng.choice(ADJECTIVES))} {obj[0]} in the box."
    return f"{name} is happy today."


def _number_fact(rng: random.Random) -> str:
    """``a + b = c`` with a, b in 0 .. 9, or ``a - b = c`` with a in 0 .. 18 and b in 0 .. min(a, 9):
    every step a word problem can need."""
    if rng.random() < 0.5:
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        return f"{a} + {b} = {a + b}."
    a = rng.randint(0, 2 * MAX_OPERAND)
    b = rng.randint(0, min(a, MAX_OPERAND))
    return f"{a} - {b} = {a - b}."


def _number_story(rng: random.Random) -> str:
    """A count that changes, with its sum written out: the skill the task needs, in prose."""
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a = rng.randint(1, MAX_OPERAND)
    if rng.random() < 0.5:
        b = rng.randint(1, MAX_OPERAND)
        verb = rng.choice(("buys", "finds", "gets"))
        return f"{name} had {_count(a, obj)} and {verb} {b} more, so now {name} has {a} + {b} = {a + b}."
    a = rng.randint(1, 2 * MAX_OPERAND)
    b = rng.randint(1, min(a, MAX_OPERAND))
    verb = rng.choice(("gives", "loses", "sells"))
    return f"{name} had {_count(a, obj)} and {verb} {b}, so now {name} has {a} - {b} = {a - b}."


def base_corpus(n_chars: int = 200_000, seed: int = 0) -> str:
    """About ``n_chars`` characters of base text: short stories of 3 to 6 sentences, one per line.
    A quarter of the sentences are number facts (``a + b = c.`` / ``a - b = c.``), and a sixth are
    one-step stories with their sum written out (``... so now Tom has 3 + 5 = 8.``).

    Deterministic in ``seed``. Never contains the task's ``Question:`` / ``Solution:`` / ``Answer:``.
    """
    rng = random.Random(f"base:{seed}")
    lines, size = [], 0
    while size < n_chars:
        parts = []
        for _ in range(rng.randint(3, 6)):
            x = rng.random()
            parts.append(_number_fact(rng) if x < 0.25 else _number_story(rng) if x < 0.4 else _base_sentence(rng))
        line = " ".join(parts)
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Task: arithmetic word problems


@dataclass(frozen=True)
class WordProblem:
    """One problem: ``prompt`` (the question, what the model is given), ``response`` (the worked
    solution and ``Answer: <answer>``, what it learns to write) and the integer ``answer``."""

    prompt: str
    response: str
    answer: int

    @property
    def text(self) -> str:
        return self.prompt + self.response


def _gain(rng: random.Random, name: str, obj) -> tuple[str, str]:
    """A sentence that adds to the count, with a blank for the number: (template, verb-phrase kind)."""
    return rng.choice((
        "{p} buys {n} more.",
        "{p} finds {n} more.",
        "{other} gives {them} {n} more.",
        "{p} gets {n} more at the {place}.",
    )), "+"


def _loss(rng: random.Random, name: str, obj) -> tuple[str, str]:
    return rng.choice((
        "{p} gives {n} to {other}.",
        "{p} loses {n} at the {place}.",
        "{p} eats {n} of them." if obj[0] in ("apple", "pear", "cookie", "egg") else "{p} sells {n} of them.",
        "{other} takes {n} of them.",
    )), "-"


def make_problem(rng: random.Random, steps: int) -> WordProblem:
    """A ``steps``-step problem (1 or 2). Every intermediate count stays in 0 .. 2 * MAX_OPERAND,
    and every operand in 1 .. MAX_OPERAND, so each step is a number fact of the base corpus."""
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    them = "her" if name in SHE else "him"
    count = rng.randint(1, MAX_OPERAND)
    sentences = [f"{name} has {_count(count, obj)}."]
    equations = []
    for i in range(steps):
        # Subtract when the count allows it and the coin says so; operands are single digits.
        if count >= 1 and (count > MAX_OPERAND or rng.random() < 0.5):
            template, op = _loss(rng, name, obj)
            n = rng.randint(1, min(count, MAX_OPERAND))
            new = count - n
        else:
            template, op = _gain(rng, name, obj)
            n = rng.randint(1, MAX_OPERAND)
            new = count + n
        p = _pronoun(name) if i == 0 else f"Then {_pronoun(name).lower()}"
        s = template.format(p=p, n=n, other=other, them=them, place=rng.choice(PLACES))
        if i > 0 and not s.startswith("Then"):
            s = "Then " + s[0].lower() + s[1:] if s.startswith(("He ", "She ")) else "Then " + s
        sentences.append(s)
        equations.append(f"{count} {op} {n} = {new}.")
        count = new
    question = " ".join(sentences) + f" How many {obj[1]} does {name} have now?"
    prompt = f"Question: {question}\n"
    response = f"{' '.join(equations)}\nAnswer: {count}\n"
    return WordProblem(prompt, response, count)


def word_problems(n: int, seed: int = 0, split: str = "train", two_step_fraction: float = 0.5) -> list[WordProblem]:
    """``n`` word problems, deterministic in (``seed``, ``split``); about ``two_step_fraction`` of
    them need two steps. Train and test draw from independent streams; a test problem whose text
    also occurs in the train stream of the same seed is possible (the space is finite) but rare."""
    rng = random.Random(f"task:{split}:{seed}")
    return [make_problem(rng, 2 if rng.random() < two_step_fraction else 1) for _ in range(n)]


_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


def extract_answer(text: str) -> Optional[int]:
    """The integer after the first ``Answer:`` in generated text, or ``None`` when there is none."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def exact_match(predictions: Sequence[Optional[int]], answers: Sequence[int]) -> float:
    """Fraction of predictions equal to their answer (``None`` never matches). 0.0 for no items."""
    if len(predictions) != len(answers):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return sum(p is not None and p == a for p, a in zip(predictions, answers)) / len(answers)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


class CharTokenizer:
    """One token per character: printable ASCII and newline, plus ``<pad>``, ``<bos>``, ``<eos>``.

    Unknown characters raise (every generator above stays inside the alphabet).
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self) -> None:
        chars = ["\n"] + [chr(c) for c in range(32, 127)]
        self.itos = list(self.SPECIALS) + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ValueError(f"CharTokenizer: character {e.args[0]!r} is outside the demo alphabet") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(self.SPECIALS))


class HFTokenizer:
    """The same interface over a transformers tokenizer (used with ``--model``)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        pad = tok.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
