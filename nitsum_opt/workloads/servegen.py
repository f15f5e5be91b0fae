"""Sample a request trace from ServeGen per-client window data (see :mod:`.servegen_data` for the files).

**Arrivals.** For each client and 600 s window with ``rate_rps > 0`` the window holds ``n`` requests, where
``n = rate_rps × 600 × rate_scale`` rounded stochastically (so the expected count is exact; at
``rate_scale = 1`` it is the recorded count, which is an integer in the data). ``n + 1`` gaps are drawn from
the window's fitted distribution (``Gamma(shape, scale)`` or ``Weibull(shape, scale)``) and rescaled to span
the window, and the first ``n`` partial sums are the arrivals: the window's rate is reproduced exactly and
the burstiness (CV) of the fitted shape is kept. ServeGen's own generator does the same rescaling but draws
``ceil(rate × 600)`` gaps and drops the arrival that lands on the window's end, losing about one request
per window; this sampler does not.

**Lengths.** A request of client ``c`` at time ``t`` draws its input and output lengths independently from
``c``'s distributions for the 6-h window containing ``t`` (the latest earlier non-empty window when that one
is empty, as ServeGen does, else the earliest later one). ServeGen publishes marginals only, so input and
output are independent by construction. Multimodal data: input = text tokens + the tokens of each sampled
image/audio/video item. Lengths of 0 are raised to 1 (the trace needs ≥ 1) and counted in the report.

**Missing clients.** Some high-volume clients have no length data in the snapshot (README A3: 37 % of
m-large's requests, 29 % of m-mid's, 57 % of m-small's). ``missing_lengths`` says what to do with them:

* ``"pool"`` (default): keep their arrivals (the rate stays right) and draw their lengths from the mixture of
  the present clients' distributions in the same 6-h window, weighted by each present client's request
  volume there. The length distribution is then that of the present clients, which is biased whenever the
  missing (large) clients differ; the report states the share of requests sampled this way.
* ``"drop"``: leave those clients out (lengths unbiased for the clients kept, rate too low by that share).
* ``"error"``: refuse when a selected client has no length data.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import numpy as np

from nitsum_opt.workloads.errors import LoadedTrace, LoadReport
from nitsum_opt.workloads.servegen_data import (
    DATASET_WINDOW_S,
    WINDOW_S,
    Pmf,
    ServeGenDatasets,
    ServeGenWindows,
    datasets_path_for,
    read_servegen_datasets,
    read_servegen_windows,
)
from nitsum_opt.workloads.trace import RequestTrace

MissingLengths = Literal["pool", "drop", "error"]
_MODALITIES = ("image", "audio", "video")


def _stochastic_round(value: float, rng: np.random.Generator) -> int:
    whole = int(np.floor(value))
    return whole + int(rng.random() < value - whole)


def _window_arrivals(dist: int, shape: float, scale: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` arrival offsets in ``(0, WINDOW_S)`` with the fitted gap shape, rescaled to span the window."""
    gaps = rng.gamma(shape, scale, n + 1) if dist == 1 else scale * rng.weibull(shape, n + 1)
    total = gaps.sum()
    if not (np.isfinite(total) and total > 0):
        return np.sort(rng.uniform(0.0, WINDOW_S, n))
    return np.cumsum(gaps[:n]) * (WINDOW_S / total)


def _select_rows(
    windows: ServeGenWindows, start_s: float, end_s: float, clients: Collection[int] | None, top: int | None
) -> np.ndarray:
    first_window = np.floor(start_s / WINDOW_S) * WINDOW_S
    mask = (windows.window_start_s >= first_window) & (windows.window_start_s < end_s) & (windows.rate_rps > 0)
    if clients is not None:
        unknown = sorted(set(clients) - set(np.unique(windows.client_id).tolist()))
        if unknown:
            raise ValueError(f"clients {unknown[:10]} do not appear in {windows.path}")
        mask &= np.isin(windows.client_id, list(clients))
    if top is not None:
        volume = windows.requests_per_client(first_window, end_s)
        chosen = sorted(volume, key=lambda c: (-volume[c], c))[:top]
        mask &= np.isin(windows.client_id, chosen)
    rows = np.flatnonzero(mask)
    return rows[np.lexsort((windows.window_start_s[rows], windows.client_id[rows]))]


def _input_lengths(cells: dict[str, Pmf], rng: np.random.Generator, n: int, path: str) -> np.ndarray:
    if "input_tokens" in cells:
        return cells["input_tokens"].sample(rng, n)
    if "text_tokens" not in cells:
        raise ValueError(f"{path}: length data has fields {sorted(cells)}; expected input_tokens or text_tokens")
    total = cells["text_tokens"].sample(rng, n)
    for modality in _MODALITIES:
        count_pmf, token_pmf = cells.get(f"{modality}_count"), cells.get(f"{modality}_tokens")
        if count_pmf is None or token_pmf is None:
            continue
        counts = count_pmf.sample(rng, n).astype(np.int64)
        draws = token_pmf.sample(rng, int(counts.sum()))
        total = total + np.bincount(np.repeat(np.arange(n), counts), weights=draws, minlength=n)
    return total


class _LengthSampler:
    """Draws lengths per (client, 6-h window) group, with the missing-client policy."""

    def __init__(self, windows: ServeGenWindows, datasets: ServeGenDatasets, policy: MissingLengths) -> None:
        self.windows, self.datasets, self.policy = windows, datasets, policy
        self.pooled_requests = 0
        self._donors: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def donors(self, window_s: int) -> tuple[np.ndarray, np.ndarray]:
        if window_s not in self._donors:
            self._donors[window_s] = self._find_donors(window_s)
        return self._donors[window_s]

    def _find_donors(self, window_s: int) -> tuple[np.ndarray, np.ndarray]:
        volume = self.windows.requests_per_client(window_s, window_s + DATASET_WINDOW_S)
        present = sorted(c for c in self.datasets.clients if self.datasets.lookup(c, window_s) is not None)
        if not present:
            raise ValueError(f"{self.datasets.path}: no client has length data; cannot sample lengths")
        weights = np.asarray([volume.get(c, 0.0) for c in present])
        if weights.sum() <= 0:
            weights = np.ones(len(present))
        return np.asarray(present), weights / weights.sum()

    def sample(self, client: int, window_s: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(2, n)`` array of input and output lengths."""
        cells = self.datasets.lookup(client, window_s)
        if cells is not None:
            return self._draw(cells, n, rng)
        if self.policy == "error":
            raise ValueError(
                f"client {client} has no length data in {self.datasets.path}; choose missing_lengths='pool' "
                "or 'drop', or leave the client out"
            )
        self.pooled_requests += n
        present, weights = self.donors(window_s)
        picks = rng.choice(present.size, size=n, p=weights)
        lengths = np.empty((2, n), dtype=np.float64)
        for donor in np.unique(picks):
            where = np.flatnonzero(picks == donor)
            cells = self.datasets.lookup(int(present[donor]), window_s)
            lengths[:, where] = self._draw(cells, where.size, rng)  # type: ignore[arg-type]
        return lengths

    def _draw(self, cells: dict[str, Pmf], n: int, rng: np.random.Generator) -> np.ndarray:
        if "output_tokens" not in cells:
            raise ValueError(f"{self.datasets.path}: length data has no output_tokens (fields {sorted(cells)})")
        return np.vstack([_input_lengths(cells, rng, n, self.datasets.path), cells["output_tokens"].sample(rng, n)])


def sample_servegen(
    windows: ServeGenWindows,
    datasets: ServeGenDatasets,
    *,
    start_s: float = 0.0,
    duration_s: float = 3600.0,
    clients: Collection[int] | None = None,
    top_clients: int | None = None,
    rate_scale: float = 1.0,
    missing_lengths: MissingLengths = "pool",
    seed: int = 0,
    tier: str = "default",
    source_name: str = "servegen",
) -> LoadedTrace:
    """Sample requests in ``[start_s, start_s + duration_s)`` of the ServeGen timeline, returned on a clock
    that starts at 0. ``clients`` / ``top_clients`` (the busiest N in the span) restrict the clients;
    ``rate_scale`` multiplies every window's rate. Same inputs and seed, same trace."""
    if not (duration_s > 0 and start_s >= 0 and rate_scale > 0):
        raise ValueError(
            f"need duration_s > 0, start_s ≥ 0 and rate_scale > 0; got {duration_s}, {start_s}, {rate_scale}"
        )
    if missing_lengths not in ("pool", "drop", "error"):
        raise ValueError(f"missing_lengths={missing_lengths!r}; use 'pool', 'drop' or 'error'")
    end_s = start_s + duration_s
    rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(source_name.encode())]))
    rows = _select_rows(windows, start_s, end_s, clients, top_clients)
    absent = sorted(set(windows.client_id[rows].tolist()) - datasets.clients)
    if missing_lengths == "drop":
        rows = rows[~np.isin(windows.client_id[rows], absent)]
    times, owners = [], []
    for row in rows.tolist():
        n = _stochastic_round(windows.rate_rps[row] * WINDOW_S * rate_scale, rng)
        if n:
            times.append(
                windows.window_start_s[row]
                + _window_arrivals(int(windows.dist[row]), float(windows.shape[row]), float(windows.scale[row]), n, rng)
            )
            owners.append(np.full(n, windows.client_id[row]))
    arrival = np.concatenate(times) if times else np.zeros(0)
    owner = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    keep = (arrival >= start_s) & (arrival < end_s)
    arrival, owner = arrival[keep], owner[keep]
    lengths, sampler = _sample_lengths(arrival, owner, windows, datasets, missing_lengths, rng)
    zeros = int(np.count_nonzero(lengths < 1))
    lengths = np.maximum(lengths, 1).round().astype(np.int64)
    trace = RequestTrace.from_arrays(
        arrival - start_s,
        lengths[0],
        lengths[1],
        tier_names=(tier,),
        source_names=(source_name,),
        start_s=0.0,
        end_s=duration_s,
    )
    notes = [f"sampled [{start_s:g}, {end_s:g}) s of the ServeGen timeline at rate_scale={rate_scale:g}, seed={seed}"]
    if absent:
        share = sampler.pooled_requests / max(len(trace), 1)
        notes.append(
            f"clients without length data: {absent[:20]}{' …' if len(absent) > 20 else ''}; "
            + (
                "their arrivals were dropped (missing_lengths='drop')"
                if missing_lengths == "drop"
                else f"{sampler.pooled_requests} requests ({share:.1%}) drew lengths from the "
                "volume-weighted pool of present clients (missing_lengths='pool'); "
                "length statistics are biased toward the present clients"
            )
        )
    if zeros:
        notes.append(f"{zeros} sampled lengths of 0 tokens were raised to 1")
    report = LoadReport(
        path=f"{windows.path} + {datasets.path}",
        format="servegen",
        rows_read=int(rows.size),
        requests=len(trace),
        rows_skipped=windows.rows_skipped,
        skipped_examples=windows.skipped_examples,
        first_timestamp=f"{start_s:g}",
        notes=tuple(notes),
    )
    return LoadedTrace(trace, report)


def _sample_lengths(
    arrival: np.ndarray,
    owner: np.ndarray,
    windows: ServeGenWindows,
    datasets: ServeGenDatasets,
    policy: MissingLengths,
    rng: np.random.Generator,
) -> tuple[np.ndarray, _LengthSampler]:
    sampler = _LengthSampler(windows, datasets, policy)
    lengths = np.empty((2, arrival.size), dtype=np.float64)
    block = (arrival // DATASET_WINDOW_S).astype(np.int64)
    key = owner.astype(np.int64) * (int(block.max(initial=0)) + 1) + block
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    for where in np.split(order, bounds) if arrival.size else []:
        client, window_s = int(owner[where[0]]), int(block[where[0]]) * DATASET_WINDOW_S
        lengths[:, where] = sampler.sample(client, window_s, where.size, rng)
    return lengths, sampler


def load_servegen(
    windows_path: str | Path,
    datasets_path: str | Path | None = None,
    *,
    skip_bad_rows: bool = False,
    tier: str = "default",
    source_name: str | None = None,
    **options: object,
) -> LoadedTrace:
    """Read ServeGen window + dataset files and :func:`sample_servegen` from them (``options`` are its
    keyword arguments). The datasets file defaults to the sibling ``*_client_datasets.json[.gz]``."""
    windows = read_servegen_windows(windows_path, skip_bad_rows=skip_bad_rows)
    datasets = read_servegen_datasets(datasets_path or datasets_path_for(windows_path))
    name = source_name or "servegen:" + Path(windows_path).name.split("_client_windows")[0]
    return sample_servegen(windows, datasets, tier=tier, source_name=name, **options)  # type: ignore[arg-type]
