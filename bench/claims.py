"""When a GPU run may claim speed: its own correctness checks passed and the GPU tests run around
it passed. One rule for every benchmark (``bench.run``, ``bench.serving``) and for the session
summary that restamps them; imports no torch."""

from __future__ import annotations

from typing import Optional


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
