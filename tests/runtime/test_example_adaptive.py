"""``examples/adaptive_serving.py`` runs as documented: the control loop end to end on toy vLLM engine processes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "adaptive_serving.py"


def test_the_adaptive_serving_example_serves_every_request(capsys) -> None:  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("adaptive_serving", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    attainment = module.main(["--seconds", "8", "--epoch-s", "4"])
    out = capsys.readouterr().out
    assert "t=0 s: " in out and "t=4 s: " in out and "requests served" in out
    assert attainment and all(0.0 <= a <= 1.0 for a in attainment.values())
