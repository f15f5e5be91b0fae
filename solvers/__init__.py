"""MILP solver backends behind one contract (installed as ``nitsum_opt.solvers``); knows nothing of LLMs."""
