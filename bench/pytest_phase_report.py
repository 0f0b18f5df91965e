"""pytest plugin for the GPU session (``-p bench.pytest_phase_report``): at the end of the session,
an interrupted one included, write to ``$PHASE_REPORT`` (JSON) what was collected, what ran with
which outcome, and the node ids that never ran, so the session's SUMMARY.md can say exactly what a
phase cut short skipped."""

from __future__ import annotations

import json
import os
import time
from collections import Counter

_state: dict = dict(collected=[], deselected=0, outcomes={}, start=None)


def pytest_sessionstart(session):
    _state["start"] = time.time()


def pytest_deselected(items):
    _state["deselected"] += len(items)


def pytest_collection_finish(session):
    _state["collected"] = [item.nodeid for item in session.items]


def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        # setup/teardown only matter when they fail or skip; a failure beats an earlier pass
        prev = _state["outcomes"].get(report.nodeid)
        if prev != "failed":
            outcome = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
            _state["outcomes"][report.nodeid] = outcome


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("PHASE_REPORT")
    if not path:
        return
    outcomes = _state["outcomes"]
    not_run = [n for n in _state["collected"] if n not in outcomes]
    data = dict(exitstatus=int(exitstatus), collected=len(_state["collected"]), deselected=_state["deselected"],
                counts=dict(Counter(outcomes.values())), not_run_count=len(not_run), not_run=not_run,
                failed=sorted(n for n, o in outcomes.items() if o in ("failed", "error")),
                duration_s=round(time.time() - (_state["start"] or time.time()), 1))
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
