"""Request-level discrete-event simulator of multi-tier LLM serving (see :mod:`nitsum_opt.sim.core`)."""
