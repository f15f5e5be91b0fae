"""Files of a sweep: ``results.json`` (everything), ``results.csv`` (one row per system and load), PNG plots
(goodput and attainment vs load, per-tier attainment, the GPU timeline of the adaptive systems) and a
self-contained ``report.html`` (plots embedded as base64). Matplotlib is used through its object API (no pyplot
state), so writing a report has no global side effects."""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nitsum_opt.models.spec import Role
from nitsum_opt.sim.runner import LevelResult, SweepResult, SystemRun, TimelinePoint
from nitsum_opt.sim.summary import ATTAINMENT_TARGET, SweepSummary, break_load, summarize

_HATCH = {Role.PREFILL: "////", Role.DECODE: "....", Role.COLOCATED: ""}
_ROLE_SHORT = {Role.PREFILL: "P", Role.DECODE: "D", Role.COLOCATED: "C"}


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _series(sweep: SweepResult, system: str, value: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for lvl in sweep.levels:
        run = lvl.run(system)
        if run is not None:
            xs.append(lvl.offered_rps)
            ys.append(float(getattr(run.metrics, value)))
    return xs, ys


def _style(system: str) -> dict[str, object]:
    if system == "nitsum":
        return {"linewidth": 2.6, "color": "black", "marker": "o"}
    if system == "oracle-static":
        return {"linewidth": 1.8, "color": "tab:red", "marker": "s", "linestyle": "--"}
    return {"linewidth": 1.2, "marker": "."}


def plot_goodput(sweep: SweepResult, path: Path) -> Path:
    """Goodput and attainment vs offered load, one line per system."""
    fig = Figure(figsize=(12, 4.6))
    ax_g, ax_a = fig.subplots(1, 2)
    top = max(lvl.offered_rps for lvl in sweep.levels)
    ax_g.plot([0, top], [0, top], color="0.8", linestyle=":", label="offered")
    for system in sweep.scenario.systems:
        xs, ys = _series(sweep, system, "goodput_rps")
        if xs:
            ax_g.plot(xs, ys, label=system, **_style(system))
        xs, ys = _series(sweep, system, "attainment")
        if xs:
            ax_a.plot(xs, [100 * y for y in ys], label=system, **_style(system))
    ax_a.axhline(100 * ATTAINMENT_TARGET, color="0.5", linestyle="--", linewidth=1)
    ax_g.set(xlabel="offered load (req/s)", ylabel="goodput (req/s meeting TTFT and TPOT)", title="Goodput vs load")
    ax_a.set(xlabel="offered load (req/s)", ylabel="SLO attainment (%)", title="Attainment vs load", ylim=(0, 102))
    ax_g.grid(alpha=0.3)
    ax_a.grid(alpha=0.3)
    ax_a.legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{sweep.scenario.name}: {sweep.scenario.cluster.total_gpus} GPUs, {sweep.model_source}", fontsize=9)
    return _save(fig, path)


def plot_tiers(sweep: SweepResult, path: Path) -> Path:
    """Per-tier attainment vs offered load."""
    tiers = sweep.scenario.tiers
    fig = Figure(figsize=(4.2 * len(tiers), 4.0))
    axes = fig.subplots(1, len(tiers), squeeze=False)[0]
    for k, (ax, tier) in enumerate(zip(axes, tiers, strict=True)):
        for system in sweep.scenario.systems:
            xs, ys = [], []
            for lvl in sweep.levels:
                run = lvl.run(system)
                if run is not None:
                    xs.append(lvl.offered_rps)
                    ys.append(100 * run.metrics.tiers[k].attainment)
            if xs:
                ax.plot(xs, ys, label=system, **_style(system))
        ax.axhline(tier.slo_percentile, color="0.5", linestyle="--", linewidth=1)
        ax.set(
            title=f"{tier.name} (TTFT {tier.ttft_slo_ms:g} ms, TPOT {tier.tpot_slo_ms:g} ms)",
            xlabel="offered load (req/s)",
            ylim=(0, 102),
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("attainment (%)")
    axes[-1].legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def _merged(run: SystemRun) -> list[TimelinePoint]:
    """The timeline without consecutive repeats of the same instances (admission-only updates)."""
    out: list[TimelinePoint] = []
    for point in run.timeline:
        if not out or set(point.instances) != set(out[-1].instances):
            out.append(point)
    return out


def _timeline_axes(ax: object, run: SystemRun, tiers: list[str], gpus: int, end_s: float) -> None:
    colors = {name: f"C{k}" for k, name in enumerate(tiers)}
    points = _merged(run)
    for j, point in enumerate(points):
        t1 = points[j + 1].t_s if j + 1 < len(points) else end_s
        for inst in point.instances:
            color = colors.get(inst.tier or "", "0.6")
            g0 = min(inst.gpu_ids)
            ax.broken_barh(  # type: ignore[attr-defined]
                [(point.t_s, t1 - point.t_s)],
                (g0 + 0.05, inst.tp - 0.1),
                facecolors=color,
                edgecolor="black",
                linewidth=0.3,
                hatch=_HATCH[inst.role],
                alpha=0.8,
            )
            if (t1 - point.t_s) > 0.06 * end_s:
                ax.text(  # type: ignore[attr-defined]
                    (point.t_s + t1) / 2,
                    g0 + inst.tp / 2,
                    f"tp{inst.tp}{_ROLE_SHORT[inst.role]}",
                    ha="center",
                    va="center",
                    fontsize=6,
                )
    for gpus_paused, a, b in run.pauses:
        ax.broken_barh([(a, max(b - a, end_s / 400))], (min(gpus_paused), len(gpus_paused)), facecolors="black")  # type: ignore[attr-defined]
    ax.set(ylim=(0, gpus), xlim=(points[0].t_s if points else 0, end_s), ylabel="GPU")  # type: ignore[attr-defined]


def plot_timeline(sweep: SweepResult, level: LevelResult, path: Path) -> Path | None:
    """TP / role / tier of every GPU over the trace for the adaptive systems (and the oracle's static choice)."""
    systems = [s for s in ("nitsum", "nitsum-greedy", "oracle-static") if level.run(s) is not None]
    if not systems:
        return None
    tiers = [t.name for t in sweep.scenario.tiers]
    gpus = sweep.scenario.cluster.total_gpus
    fig = Figure(figsize=(12, 1.2 + 0.28 * gpus * len(systems)))
    axes = fig.subplots(len(systems), 1, squeeze=False)[:, 0]
    for ax, system in zip(axes, systems, strict=True):
        run = level.run(system)
        assert run is not None
        _timeline_axes(ax, run, tiers, gpus, level.duration_s)
        ax.set_title(
            f"{system} at load ×{level.load_scale:g} ({level.offered_rps:.0f} req/s): "
            f"{run.metrics.deployments} deployments, {run.metrics.engine_switches} engine switches",
            fontsize=9,
        )
    axes[-1].set_xlabel("time (s on the trace clock); black = paused for a switch")
    handles = [Patch(facecolor=f"C{k}", label=name) for k, name in enumerate(tiers)]
    handles += [Patch(facecolor="0.6", label="all tiers")]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=_HATCH[r], label=r.value) for r in Role]
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, -0.02))
    return _save(fig, path)


def timeline_level(sweep: SweepResult) -> LevelResult:
    """The level the timeline shows: where oracle-static first misses the attainment target, else the middle."""
    brk = break_load(sweep, "oracle-static")
    for lvl in sweep.levels:
        if brk is not None and lvl.load_scale == brk:
            return lvl
    return sweep.levels[len(sweep.levels) // 2]


CSV_FIELDS = (
    "load_scale",
    "offered_rps",
    "system",
    "goodput_rps",
    "goodput_per_gpu_rps",
    "attainment",
    "weighted_goodput",
    "meets_slo",
    "deployments",
    "engine_switches",
    "migrations",
    "preemptions",
    "sim_wall_s",
    "setup_wall_s",
    "deployment",
)


def write_csv(sweep: SweepResult, path: Path) -> Path:
    """One row per (load, system) with per-tier attainment columns."""
    tiers = [t.name for t in sweep.scenario.tiers]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_FIELDS, *(f"attainment_{t}" for t in tiers), *(f"goodput_{t}_rps" for t in tiers)])
        for lvl in sweep.levels:
            for run in lvl.runs:
                m = run.metrics
                row = [
                    lvl.load_scale,
                    f"{lvl.offered_rps:.3f}",
                    m.system,
                    f"{m.goodput_rps:.3f}",
                    f"{m.goodput_per_gpu_rps:.3f}",
                    f"{m.attainment:.4f}",
                    f"{m.weighted_goodput:.3f}",
                    m.meets_slo,
                    m.deployments,
                    m.engine_switches,
                    m.migrations,
                    m.preemptions,
                    f"{m.sim_wall_s:.3f}",
                    f"{run.setup_wall_s:.3f}",
                    m.deployment,
                ]
                row += [f"{t.attainment:.4f}" for t in m.tiers] + [f"{t.goodput_rps:.3f}" for t in m.tiers]
                writer.writerow(row)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}" style="max-width:100%">'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def write_html(sweep: SweepResult, summary: SweepSummary, images: list[Path], path: Path) -> Path:
    """The self-contained HTML report."""
    sc = sweep.scenario
    tiers = _table(
        ["tier", "TTFT SLO ms", "TPOT SLO ms", "percentile", "weight"],
        [
            [t.name, f"{t.ttft_slo_ms:g}", f"{t.tpot_slo_ms:g}", f"{t.slo_percentile:g}", f"{t.weight:g}"]
            for t in sc.tiers
        ],
    )
    targets = _table(
        ["target", "load ×", "measured", "required", "ceiling", "met", "note"],
        [
            [
                t.name,
                _fmt(t.load_scale, "g"),
                _fmt(t.ratio),
                f"{t.target:g}",
                _fmt(t.ceiling),
                {True: "yes", False: "no", None: "–"}[t.met],
                t.note,
            ]
            for t in summary.targets
        ],
    )
    maxload = _table(
        ["system", "max load × at ≥ 90 %", "max req/s at ≥ 90 %", "peak goodput req/s"],
        [
            [s.system, _fmt(s.max_load_scale), _fmt(s.max_offered_rps, ".1f"), f"{s.peak_goodput_rps:.1f}"]
            for s in summary.systems
        ],
    )
    ratios = _table(
        ["load ×", "offered req/s", "nitsum goodput", "strongest other", "its goodput", "ratio"],
        [
            [
                f"{c.load_scale:g}",
                f"{c.offered_rps:.1f}",
                _fmt(c.nitsum_goodput_rps, ".1f"),
                c.strongest_other or "–",
                _fmt(c.strongest_other_goodput_rps, ".1f"),
                _fmt(c.ratio),
            ]
            for c in summary.levels
        ],
    )
    notes = sorted({f"{name}: {why}" for lvl in sweep.levels for name, why in lvl.skipped})
    skipped = "".join(f"<p><b>skipped</b> {html.escape(n)}</p>" for n in notes)
    level_tables = []
    for lvl in sweep.levels:
        rows = [
            [
                r.metrics.system,
                f"{r.metrics.goodput_rps:.1f}",
                f"{r.metrics.goodput_per_gpu_rps:.2f}",
                f"{r.metrics.attainment:.1%}",
                *(f"{t.attainment:.1%}" for t in r.metrics.tiers),
                str(r.metrics.engine_switches),
                r.metrics.deployment,
            ]
            for r in lvl.runs
        ]
        headers = [
            "system",
            "goodput req/s",
            "per GPU",
            "attainment",
            *(t.name for t in sc.tiers),
            "switches",
            "deployment",
        ]
        level_tables.append(
            f"<h3>load ×{lvl.load_scale:g} ({lvl.offered_rps:.1f} req/s, {lvl.requests} requests)</h3>"
            + _table(headers, rows)
        )
    body = f"""<h1>Nitsum simulation report: {html.escape(sc.name)}</h1>
<p>{sc.cluster.total_gpus} GPUs ({sc.cluster.num_nodes}×{sc.cluster.gpus_per_node} {html.escape(sc.cluster.gpu_type)}),
model {html.escape(sc.model_spec.name)}, step times: {html.escape(sweep.model_source)}.
Epoch {sc.settings.epoch_s:g} s, switch pause {sc.settings.switch.switch_s:g} s,
KV migration {sc.settings.switch.kv_migration_gb_s:g} GB/s.
Ran in {sweep.wall_s:.1f} s on {html.escape(sweep.machine)} with {sweep.workers} worker(s).</p>
{skipped}<h2>Tiers</h2>{tiers}<h2>Targets</h2>{targets}<h2>Max load at ≥ 90 % attainment</h2>{maxload}
<h2>Nitsum vs the strongest other system</h2>{ratios}
<h2>Plots</h2>{"".join(_img(p) for p in images)}
<h2>Every run</h2>{"".join(level_tables)}"""
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}th{background:#eee}"
    )
    head = f"<meta charset='utf-8'><title>Nitsum report: {html.escape(sc.name)}</title><style>{style}</style>"
    path.write_text(f"<!doctype html><html><head>{head}</head><body>{body}</body></html>", encoding="utf-8")
    return path


def write_report(sweep: SweepResult, out_dir: Path) -> dict[str, Path]:
    """Write every file of the report into ``out_dir``; returns them by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(sweep)
    files = {
        "json": out_dir / "results.json",
        "csv": write_csv(sweep, out_dir / "results.csv"),
        "goodput": plot_goodput(sweep, out_dir / "goodput.png"),
        "tiers": plot_tiers(sweep, out_dir / "tier_attainment.png"),
    }
    payload = {"sweep": json.loads(sweep.model_dump_json()), "summary": json.loads(summary.model_dump_json())}
    files["json"].write_text(json.dumps(payload, indent=1), encoding="utf-8")
    timeline = plot_timeline(sweep, timeline_level(sweep), out_dir / "timeline.png")
    if timeline is not None:
        files["timeline"] = timeline
    images = [files[k] for k in ("goodput", "tiers", "timeline") if k in files]
    files["html"] = write_html(sweep, summary, images, out_dir / "report.html")
    return files
