"""Write a :class:`LinearModel` as CPLEX-LP or free MPS text, deterministically (for debugging and goldens).

The writer is our own, so golden files do not change when a solver package is upgraded. Numbers are written
with ``repr``-exact round-tripping (``float.__repr__``). MPS keeps names as given (``n[chat,tp2-decode]``); the
LP format forbids ``[``, ``]`` and ``-`` in names (``-`` is an operator), so LP names are spelled
``n(chat,tp2_decode)`` — :func:`lp_name` is the mapping.
"""

from __future__ import annotations

import math
from pathlib import Path

from .model import Constraint, LinearModel

_LP_NAME = str.maketrans({"[": "(", "]": ")", "-": "_", "+": "_", ":": "_", "^": "_", "<": "_", ">": "_", "=": "_"})


def lp_name(name: str) -> str:
    """``name`` as the LP format accepts it (``n[a,tp2-decode]`` -> ``n(a,tp2_decode)``)."""
    return name.translate(_LP_NAME)


def _num(x: float) -> str:
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _terms(model: LinearModel, terms: tuple[tuple[int, float], ...] | list[tuple[int, float]]) -> str:
    parts: list[str] = []
    for i, coef in terms:
        sign = "-" if coef < 0 else "+"
        mag = abs(coef)
        name = lp_name(model.variables[i].name)
        parts.append(f"{sign} {name}" if mag == 1 else f"{sign} {_num(mag)} {name}")
    if not parts:
        return "0 " + lp_name(model.variables[0].name) if model.variables else "0"
    text = " ".join(parts)
    return text[2:] if text.startswith("+ ") else text


def _lp_rows(model: LinearModel, con: Constraint) -> list[str]:
    lhs = _terms(model, con.terms)
    row = lp_name(con.name)
    if con.lb == con.ub:
        return [f" {row}: {lhs} = {_num(con.ub)}"]
    rows = []
    if math.isfinite(con.ub):
        rows.append(f" {row}: {lhs} <= {_num(con.ub)}")
    if math.isfinite(con.lb):
        name = row if math.isinf(con.ub) else f"{row}__lb"
        rows.append(f" {name}: {lhs} >= {_num(con.lb)}")
    return rows


def to_lp(model: LinearModel) -> str:
    """The model in CPLEX LP format."""
    lines = [f"\\ Model {model.name}", "Maximize" if model.maximize else "Minimize"]
    obj = _terms(model, sorted(model.objective.items()))
    if model.objective_offset:
        obj += f" + {_num(model.objective_offset)} __offset"
    lines.append(f" obj: {obj}")
    lines.append("Subject To")
    for con in model.constraints:
        lines.extend(_lp_rows(model, con))
    lines.append("Bounds")
    for v in model.variables:
        lo = "-inf" if math.isinf(v.lb) else _num(v.lb)
        hi = "+inf" if math.isinf(v.ub) else _num(v.ub)
        lines.append(f" {lo} <= {lp_name(v.name)} <= {hi}")
    if model.objective_offset:
        lines.append(" __offset = 1")
    ints = [lp_name(v.name) for v in model.variables if v.is_integer]
    if ints:
        lines.append("General")
        lines.extend(f" {name}" for name in ints)
    lines.append("End")
    return "\n".join(lines) + "\n"


def to_mps(model: LinearModel) -> str:
    """The model in free MPS format (OBJSENSE section for maximisation)."""
    lines = [f"NAME {model.name}", "OBJSENSE", "    MAX" if model.maximize else "    MIN", "ROWS", " N obj"]
    row_kind: list[tuple[Constraint, str]] = []
    for con in model.constraints:
        if con.lb == con.ub:
            kind = "E"
        elif math.isfinite(con.ub):
            kind = "L"
        else:
            kind = "G"
        row_kind.append((con, kind))
        lines.append(f" {kind} {con.name}")
    columns: dict[int, list[tuple[str, float]]] = {v.index: [] for v in model.variables}
    for i, coef in sorted(model.objective.items()):
        columns[i].append(("obj", coef))
    for con in model.constraints:
        for i, coef in con.terms:
            columns[i].append((con.name, coef))
    lines.append("COLUMNS")
    in_int = False
    for v in model.variables:
        if v.is_integer != in_int:
            marker = "INTORG" if v.is_integer else "INTEND"
            lines.append(f" MARKER 'MARKER' '{marker}'")
            in_int = v.is_integer
        lines.extend(f" {v.name} {row} {_num(coef)}" for row, coef in columns[v.index])
    if in_int:
        lines.append(" MARKER 'MARKER' 'INTEND'")
    lines.append("RHS")
    for con, kind in row_kind:
        rhs = con.ub if kind in ("E", "L") else con.lb
        if rhs:
            lines.append(f" RHS {con.name} {_num(rhs)}")
    ranged = [(c, k) for c, k in row_kind if k == "L" and math.isfinite(c.lb)]
    if ranged:
        lines.append("RANGES")
        lines.extend(f" RNG {c.name} {_num(c.ub - c.lb)}" for c, _ in ranged)
    lines.append("BOUNDS")
    for v in model.variables:
        if math.isinf(v.lb) and math.isinf(v.ub):
            lines.append(f" FR BND {v.name}")
            continue
        if v.lb != 0:
            lines.append(
                f" {'MI' if math.isinf(v.lb) else 'LO'} BND {v.name}" + ("" if math.isinf(v.lb) else f" {_num(v.lb)}")
            )
        if math.isfinite(v.ub):
            lines.append(f" UP BND {v.name} {_num(v.ub)}")
        elif v.is_integer:
            lines.append(f" PL BND {v.name}")
    lines.append("ENDATA")
    return "\n".join(lines) + "\n"


def write_model(model: LinearModel, path: str | Path) -> Path:
    """Write ``model`` to ``path``; the suffix (``.lp`` or ``.mps``) picks the format."""
    out = Path(path)
    if out.suffix == ".lp":
        out.write_text(to_lp(model))
    elif out.suffix == ".mps":
        out.write_text(to_mps(model))
    else:
        raise ValueError(f"cannot export to {out.name!r}: use a .lp or .mps file name")
    return out
