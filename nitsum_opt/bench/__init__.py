"""Benchmarks shipped with the library (``nitsum bench ...``): random planning instances and solve timing."""
