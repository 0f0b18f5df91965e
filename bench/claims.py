"""What a benchmark's record claims: the code it measured, and whether it may claim speed (its own
correctness checks passed and the GPU tests run around it passed). One rule for every benchmark
(``bench.run``, ``bench.serving``, ``bench.tile_sweep``) and for the session summary that restamps
them; imports no torch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional, Union


def measured_commit() -> tuple[Optional[str], Optional[bool]]:
    """(commit, uncommitted changes?) of the tree the benchmark runs from. ``BENCH_COMMIT``, when set,
    names it: the GPU machine's copy of the tree can carry git metadata of an older commit (the
    2026-11-30 run of 1f403e4 recorded 0ceb4ed, dirty). ``dirty`` comes from git only when git's HEAD
    is that commit, else it is unknown (None). Without ``BENCH_COMMIT``: git's HEAD and status."""
    root = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=root).stdout.strip()
    except OSError:
        sha, dirty = "", ""
    named = os.environ.get("BENCH_COMMIT") or None
    if named is not None:
        return named, (bool(dirty) if sha and sha.startswith(named) else None)
    return (sha, bool(dirty)) if sha else (None, None)


#: ``tests_exit_code`` of a run made before the cuda-marked tests that gate it have ended (the GPU
#: session's microbenchmark runs first): no claims until the session restamps the tests' exit code.
TESTS_PENDING = "pending"
_PENDING_REASON = "the cuda-marked tests had not finished when this was written"


def tests_exit_code(text: str) -> Union[int, str]:
    """``--tests-exit-code``'s argument: the tests' exit code, or ``pending``."""
    return TESTS_PENDING if text == TESTS_PENDING else int(text)


def apply_tests_exit_code(meta: dict, tests_exit_code: Union[int, str, None]) -> None:
    """Record the GPU tests' exit code in a run's ``meta``. Anything but 0 (``pending``: not finished
    yet; -1: did not run) withdraws a GPU run's speed claims, saying why; 0 after ``pending`` gives
    back what ``pending`` withdrew (a withdrawal for any other reason stands)."""
    if tests_exit_code is None:
        return
    only_pending = meta.get("no_claims_reason") == _PENDING_REASON
    meta["tests_exit_code"] = tests_exit_code
    if meta.get("mode") != "gpu":
        return
    if tests_exit_code == 0:
        if only_pending:
            meta["speed_claims"] = True
            del meta["no_claims_reason"]
        return
    meta["speed_claims"] = False
    meta["no_claims_reason"] = (_PENDING_REASON if tests_exit_code == TESTS_PENDING else
                                "the cuda-marked tests did not run" if tests_exit_code == -1 else
                                f"the cuda-marked tests failed or were cut short (exit code {tests_exit_code})")
