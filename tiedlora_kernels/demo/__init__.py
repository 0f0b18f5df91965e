"""End-to-end demo: fine-tune a small transformer with every adapter preset and compare them.

Run it with ``python -m tiedlora_kernels demo`` (or ``tiedlora demo``); ``--help`` lists the flags.
:mod:`.data` generates the embedded corpora, :mod:`.train` pretrains, adapts and evaluates,
:mod:`.report` writes the table and plot, :mod:`.run` ties them together.
"""

from .data import CharTokenizer, WordProblem, base_corpus, exact_match, extract_answer, word_problems
from .run import PRESET_LR, add_arguments, main, run_demo

__all__ = ["run_demo", "main", "add_arguments", "PRESET_LR", "CharTokenizer", "WordProblem", "base_corpus",
           "word_problems", "extract_answer", "exact_match"]
