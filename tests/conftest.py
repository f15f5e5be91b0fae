"""Shared pytest configuration: tests marked ``gpu`` are deselected by default (see pyproject addopts)."""
