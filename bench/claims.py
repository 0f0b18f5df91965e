"""What a benchmark's record claims: the code it measured, and whether it may claim speed (its own
correctness checks passed and the GPU tests run around it passed). One rule for every benchmark
(``bench.run``, ``bench.serving``, ``bench.tile_sweep``) and for the session summary that restamps
them; imports no torch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional


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


def withdraw_if_tests_failed(meta: dict, tests_exit_code: Optional[int]) -> None:
    """Record the GPU tests' exit code in a run's ``meta``; a nonzero one (-1: the tests did not run)
    withdraws a GPU run's speed claims, saying why."""
    if tests_exit_code is None:
        return
    meta["tests_exit_code"] = tests_exit_code
    if tests_exit_code != 0 and meta.get("mode") == "gpu":
        meta["speed_claims"] = False
        meta["no_claims_reason"] = ("the cuda-marked tests did not run" if tests_exit_code == -1 else
                                    f"the cuda-marked tests failed or were cut short (exit code {tests_exit_code})")
