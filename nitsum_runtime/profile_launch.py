"""Run profiling engines as separate processes, in parallel where the GPUs allow.

Each (model, TP) pair is a :class:`Job`. Jobs start in the order given, each on the first free aligned block
of ``tp`` GPUs (TP2 on GPUs {0,1} or {2,3}, TP4 on {0..3}), as a worker process
(:mod:`nitsum_runtime.profile_worker`) in a new session (``setsid``) with ``CUDA_VISIBLE_DEVICES`` set. A job
ends when its worker writes ``<stem>.done`` (then its whole process group is killed: vLLM teardown can hang),
when the worker exits, or at its time limit (killed; the rows it wrote stay). Its GPUs are reused once
``nvidia-smi`` shows their memory free again.

A launch has an overall deadline: a job that cannot get a useful amount of stepping before it is not started,
and each worker is told when to stop starting new configurations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nitsum_runtime.profile_io import part_stem
from nitsum_runtime.vllm_engine import VLLM_ENVIRONMENT

#: Seconds allowed for an engine to start (import, weights, compile, CUDA graphs) before stepping begins.
START_ALLOWANCE_S = 150.0
#: Seconds a worker needs after its stepping deadline (sleep/wake timing, final files).
FINISH_ALLOWANCE_S = 40.0
#: GPU memory (MiB) below which a GPU counts as free again after its engine was killed.
FREE_GPU_MIB = 2048


@dataclass(frozen=True, slots=True)
class Job:
    """One engine to profile."""

    model: str
    tp: int

    @property
    def stem(self) -> str:
        """Part-file stem (the worker's model name is the preset's, or its ``-2l`` smoke variant)."""
        return part_stem(self.model, self.tp)


def plan_jobs(models: Sequence[str], tps: Sequence[int]) -> list[Job]:
    """Jobs in start order: by TP, then model (small engines first; TP4 ones start once all GPUs free up)."""
    return [Job(m, tp) for tp in sorted(set(tps)) for m in models]


def gpu_blocks(gpus: Sequence[int], tp: int) -> list[tuple[int, ...]]:
    """Aligned blocks of ``tp`` GPUs from ``gpus`` (positions ``k·tp .. k·tp+tp-1``)."""
    if tp < 1:
        raise ValueError(f"tp={tp} must be >= 1")
    return [tuple(gpus[i : i + tp]) for i in range(0, len(gpus) - tp + 1, tp)]


def first_free_block(gpus: Sequence[int], tp: int, busy: set[int]) -> tuple[int, ...] | None:
    """The first aligned block of ``tp`` GPUs none of which is busy, or ``None``."""
    for block in gpu_blocks(gpus, tp):
        if not busy.intersection(block):
            return block
    return None


@dataclass
class _Running:
    job: Job
    gpus: tuple[int, ...]
    proc: subprocess.Popen[bytes]
    started: float
    hard_deadline: float
    log_path: Path


@dataclass
class LaunchResult:
    """How each job ended: ``done``, ``exit <code>``, ``timeout`` or ``not started``."""

    outcome: dict[str, str] = field(default_factory=dict)


def _gpu_memory_used_mib() -> dict[int, int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    used = {}
    for line in out.strip().splitlines():
        idx, mib = (s.strip() for s in line.split(","))
        used[int(idx)] = int(float(mib))
    return used


def _wait_gpus_free(gpus: tuple[int, ...], log: Callable[[str], None], timeout_s: float = 90.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            used = _gpu_memory_used_mib()
        except (OSError, subprocess.SubprocessError, ValueError):
            time.sleep(3)
            return
        if all(used.get(g, 0) < FREE_GPU_MIB for g in gpus):
            return
        time.sleep(1)
    log(f"GPUs {gpus} still hold memory after {timeout_s:.0f} s; starting the next engine anyway")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][-160:] if lines else ""


def pack_parts(parts_dir: Path, archive: Path) -> None:
    """Pack the part folder into ``archive`` (tar.gz, replaced atomically)."""
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(parts_dir, arcname=parts_dir.name)
    tmp.replace(archive)


def launch(
    jobs: Sequence[Job],
    gpus: Sequence[int],
    parts_dir: Path,
    budget_s: dict[int, float],
    deadline_s: float,
    command: str,
    smoke: bool = False,
    pack: Path | None = None,
    log: Callable[[str], None] = print,
    passes: int = 1,
) -> LaunchResult:
    """Run every job (see the module docstring); returns how each ended.

    ``budget_s[tp]`` is the stepping time wanted per engine; ``deadline_s`` bounds the whole launch (seconds
    from now). ``pack``: a tar.gz of ``parts_dir`` rewritten after every job (for runs cut off by a limit).
    ``passes``: times each engine measures its whole grid (within its budget).
    """
    parts_dir.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + deadline_s
    pending, running, result = list(jobs), [], LaunchResult()
    busy: set[int] = set()
    last_status = 0.0
    for job in jobs:
        if job.tp > len(gpus):
            raise ValueError(f"{job.stem} needs {job.tp} GPUs but only {list(gpus)} were given (--gpus)")
    while pending or running:
        now = time.monotonic()
        while pending:
            job = pending[0]
            block = first_free_block(gpus, job.tp, busy)
            if block is None:
                break
            left = end - now - START_ALLOWANCE_S - FINISH_ALLOWANCE_S
            if left < min(30.0, budget_s[job.tp]):
                result.outcome[job.stem] = "not started (deadline)"
                log(f"{job.stem}: not started, {end - now:.0f} s left in the launch")
                pending.pop(0)
                continue
            budget = min(budget_s[job.tp], left)
            running.append(_start(job, block, parts_dir, budget, smoke, command, now, passes))
            busy.update(block)
            pending.pop(0)
            log(f"{job.stem}: started on GPUs {block}, stepping budget {budget:.0f} s")
        for r in list(running):
            outcome = _poll(r, parts_dir, now)
            if outcome is None:
                continue
            running.remove(r)
            result.outcome[r.job.stem] = outcome
            log(
                f"{r.job.stem}: {outcome} after {time.monotonic() - r.started:.0f} s; "
                f"last log line: {_last_line(r.log_path)}"
            )
            _wait_gpus_free(r.gpus, log)
            busy.difference_update(r.gpus)
            if pack is not None:
                pack_parts(parts_dir, pack)
        if running and now - last_status > 30:
            last_status = now
            for r in running:
                log(f"  {r.job.stem}: {_last_line(r.log_path)}")
        time.sleep(0.5)
    if pack is not None:
        pack_parts(parts_dir, pack)
    return result


def _start(
    job: Job,
    block: tuple[int, ...],
    parts_dir: Path,
    budget: float,
    smoke: bool,
    command: str,
    now: float,
    passes: int = 1,
) -> _Running:
    env = {
        **os.environ,
        **VLLM_ENVIRONMENT,
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(map(str, block)),
        "PYTHONUNBUFFERED": "1",
    }
    parts_dir = parts_dir.resolve()
    argv = [
        sys.executable,
        "-m",
        "nitsum_runtime.profile_worker",
        "--model",
        job.model,
        "--tp",
        str(job.tp),
        "--out",
        str(parts_dir),
        "--budget-s",
        f"{budget:.0f}",
        "--command",
        command,
        "--passes",
        str(passes),
    ]
    if smoke:
        argv.append("--smoke")
    log_path = parts_dir / f"{job.stem}.log"
    with log_path.open("wb") as fh:
        # cwd = the parts folder: `python -m` puts the cwd first on sys.path, and a source checkout there
        # would shadow the installed package (whose nitsum_opt.models is mapped from models/).
        proc = subprocess.Popen(
            argv, cwd=parts_dir, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    limit = START_ALLOWANCE_S + budget + FINISH_ALLOWANCE_S
    return _Running(job, block, proc, now, now + limit, log_path)


def _done_marker(parts_dir: Path, job: Job) -> bool:
    return any(parts_dir.glob(f"{job.model}*-tp{job.tp}.done"))


def _poll(r: _Running, parts_dir: Path, now: float) -> str | None:
    if _done_marker(parts_dir, r.job):
        time.sleep(1.0)
        _kill_group(r.proc)
        return "done"
    code = r.proc.poll()
    if code is not None:
        _kill_group(r.proc)
        return "done" if _done_marker(parts_dir, r.job) else f"exit {code}"
    if now > r.hard_deadline:
        _kill_group(r.proc)
        return "timeout"
    return None
