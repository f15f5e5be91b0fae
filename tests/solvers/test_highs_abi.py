"""OR-Tools and highspy each ship a ``libhighs.so.1``; one process must be able to use both (pinned pair)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import numpy as np
import pulp  # loads highspy's libhighs first: the order that crashed with mismatched releases
from nitsum_opt import MilpPlanner
from nitsum_opt.bench.instances import random_planning_input
inp = random_planning_input(np.random.default_rng(1), 1024, with_current_plan=True)
objectives = {s: MilpPlanner(s, time_limit_s=5).plan(inp).objective for s in ("ortools/highs", "pulp/highs")}
assert abs(objectives["ortools/highs"] - objectives["pulp/highs"]) < 1e-6 * abs(objectives["pulp/highs"]), objectives
print("ok")
"""


def test_both_highs_bindings_in_one_process() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok"
