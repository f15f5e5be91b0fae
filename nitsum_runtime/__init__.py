"""Carries Nitsum plans out on serving engines (engine pool, TP switch by weight reuse, KV migration)."""
