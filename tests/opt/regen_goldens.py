"""Regenerate the golden LP files: ``python tests/opt/regen_goldens.py`` (then review the diff).

``<name>.lp`` is the full model (shared instances included), ``<name>.dedicated.lp`` the dedicated-only one
(``shared=False``), which must stay the model of DESIGN §4."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nitsum_opt.formulation import build_formulation
from nitsum_opt.solvers import to_lp

from planning_canonical import GOLDEN

GOLDEN_DIR = Path(__file__).with_name("goldens")


def main() -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    for name, factory in GOLDEN.items():
        for suffix, shared in ((".lp", True), (".dedicated.lp", False)):
            path = GOLDEN_DIR / f"{name}{suffix}"
            path.write_text(to_lp(build_formulation(factory(), shared=shared).model))
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
