"""``nitsum plan`` and ``nitsum schema`` (filled in by the planner work)."""
