"""A vLLM engine behind the :class:`~nitsum_runtime.engine.Engine` protocol, so that the pool and the transition
executor drive vLLM exactly as they drive the reference engine.

The engine runs in its own process and session (:func:`~nitsum_runtime.vllm_process.engine_process`, the only
code that imports vLLM, through :mod:`nitsum_runtime.vllm_engine`), driven over a pipe with the typed commands
of :mod:`nitsum_runtime.vllm_protocol`; this object is the controller's side and never imports vLLM. Its engine
core runs inside the engine process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so one :meth:`VllmEngine.step` is
one scheduler iteration and an engine nobody steps makes no progress:

* **pause / resume** only stop and restart stepping; the requests and their KV stay in vLLM, so a rollback
  resumes them where they were.
* **sleep** is vLLM's ``sleep(level=2)`` (weights and KV discarded; the engine must hold no request);
  **wake** is ``wake_up(["weights"])`` then ``wake_up(["kv_cache"])``; **fill_weights** is the worker
  extension's ``nitsum_fill_weights`` (each rank's shard copied from the resident copy on its GPU through CUDA
  IPC, never from disk), without which the weights are undefined after a wake.
* With ``defer_sleep`` (default) :meth:`VllmEngine.sleep` sends the command and returns: in a transition the
  source sleeps after the commit while the target resumes, so the release of its memory overlaps the target's
  first steps instead of lying on the pause -> resume path. The memory is released before any engine sharing
  a GPU with it wakes (:meth:`VllmEngine.wake` settles its siblings' pending sleeps first), and before any
  other command to the engine itself.
* **Requests move by KV migration or re-prefill.** :meth:`VllmEngine.import_requests` re-adds each request as
  its prompt followed by the tokens generated so far, asking only for the tokens still missing (all or
  nothing). With ``kv_source=None`` the engine recomputes that context (re-prefill). With a source engine
  (engines built with ``kv_connector=True``, i.e. vLLM's ``kv_transfer_config`` naming
  :mod:`nitsum_runtime.kv_connector`), the requests' KV is first copied into buffers staged on this engine's
  workers (:mod:`nitsum_runtime.kv_mover`: source export -> CUDA IPC copies in this process, heads re-split for
  this TP -> target stage) and each request is added with an import ticket in its ``kv_transfer_params``; the
  connector then reports those tokens as computed and writes the KV into the blocks vLLM allocated, so only
  the last token is recomputed. A request whose KV cannot be moved (none cached, a failed copy) is
  re-prefilled instead (``ImportResult.reprefilled``; the reason is kept in :attr:`VllmEngine.kv_errors`).
  :meth:`can_migrate_from` says whether the path exists (both engines have the connector and this process
  sees the GPUs); the executor prices the choice (:func:`~nitsum_runtime.switch_cost.kv_switch_cost`).
* Every command has a deadline (:class:`VllmDeadlines`) enforced by the engine process's watchdog, which
  answers a stuck command (or engine step) with the engine's state and the blocked stack, then exits. A lost
  process (crash, watchdog, no answer) marks the engine failed and kills its process group; the requests it
  held are still exported from this side's copy (tokens so far, no KV), so a transition can move them to
  another engine and none is lost. :meth:`VllmEngine.restart` starts a fresh process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nitsum_opt.models.spec import ModelSpec
from nitsum_runtime.engine import (
    EngineCapacityError,
    EngineError,
    EngineState,
    FillSummary,
    GenerationRequest,
    TokenEvent,
)
from nitsum_runtime.engine_handle import EngineCommandFailed, EngineHandle, EngineNoAnswer, EngineProcessLost
from nitsum_runtime.gpu_room import WakeRoom
from nitsum_runtime.vllm_pool_kv import KvPort
from nitsum_runtime.vllm_protocol import (
    AddSpec,
    EngineStarted,
    EngineStartReport,
    StepAnswer,
    StepRow,
    VllmDeadlines,
)

if TYPE_CHECKING:
    from nitsum_runtime.kv_mover import MoveStats


@dataclass
class _Held:
    request: GenerationRequest
    output: list[int]  # every token generated so far, on any engine


class VllmEngine(KvPort, WakeRoom):
    """One vLLM engine process (a TP group of GPUs) behind the ``Engine`` protocol; see the module docstring.
    Nothing runs before :meth:`start`; the engine is then asleep."""

    prepares_concurrently = True
    """It may be woken and filled from another thread while other engines step (its own process and pipe)."""

    def __init__(
        self,
        handle: EngineHandle,
        spec: ModelSpec,
        store_handles: str,
        deadlines: VllmDeadlines | None = None,
        check_fill_at_start: bool = True,
        defer_sleep: bool = True,
        kv_connector: bool = False,
        kv_arena_bytes: int = 0,
    ) -> None:
        self.handle, self.spec, self.store_handles = handle, spec, store_handles
        self.deadlines = deadlines or VllmDeadlines()
        self.check_fill_at_start, self.defer_sleep = check_fill_at_start, defer_sleep
        self.kv_connector = kv_connector
        """The engine runs the Nitsum KV connector (it can take migrated KV)."""
        self.kv_arena_bytes = kv_arena_bytes
        """Size of each worker's KV exchange arena, made and opened at start (0: none)."""
        self.kv_arenas: list[str] = []
        """Ids of this engine's arenas opened by the controller (forgotten when the engine closes)."""
        self.kv_errors: list[str] = []
        """Why KV migrations into this engine fell back to re-prefill (latest last)."""
        self.kv_moves: list[MoveStats] = []
        """Every KV migration into this engine (copies timed in this process)."""
        self._staged: dict[str, str] = {}  # request id -> key of KV staged for it (until it finishes or drops)
        self._state = EngineState.ASLEEP
        self._resident = False  # a wake command was sent since the last sleep
        self._held: dict[str, _Held] = {}
        self.started: EngineStarted | None = None
        self.failure: str | None = None
        """Why the engine process was lost (None while it serves)."""
        self.siblings: list[VllmEngine] = []
        """Engines sharing a GPU with this one (their deferred sleeps finish before this one wakes)."""
        self.timings: dict[str, float] = {}
        self.last_engine_s = 0.0
        self.wake_bytes = ()  # measured at start (gpu_room.WakeRoom)
        self.last_step_log: tuple[StepRow, ...] = ()  # the latest step command's steps (seconds, composition)
        """Seconds the latest step spent inside vLLM's ``step()`` (from the engine process)."""
        """Seconds of the latest ``wake_weights``, ``wake_kv``, ``fill`` and ``sleep`` (a deferred sleep when
        it is collected)."""

    # identity -------------------------------------------------------------------------------------------
    @property
    def engine_id(self) -> str:
        return self.handle.name

    @property
    def gpu_ids(self) -> tuple[int, ...]:
        return self.handle.gpu_ids

    @property
    def state(self) -> EngineState:
        return self._state

    def __repr__(self) -> str:
        dead = f", failed: {self.failure.splitlines()[0]}" if self.failure else ""
        return f"VllmEngine({self.engine_id}, {self._state.value}, {len(self._held)} requests{dead})"

    # process ----------------------------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the engine process; :meth:`finish_start` completes the start (several may build at once)."""
        self.handle.launch()

    def finish_start(self) -> EngineStartReport:
        """Wait for the engine, attach the resident store, fill and cross-check the weights, sleep (level 2)."""
        d = self.deadlines
        self.started = self._guard(lambda: self.handle.wait_started(d.start_s), "start")
        self.failure = None
        self.rpc("nitsum_attach_store", self.spec.model_dump_json(), self.store_handles)
        fills = self._call("rpc", d.call_s, method="nitsum_fill_weights")
        checks = self._call("rpc", 2 * d.call_s, method="nitsum_check_fill") if self.check_fill_at_start else []
        self.warm_kv_path()
        awake_free = self._free_bytes()
        sleep_s = self._call("sleep", d.memory_s)
        self._state, self._resident = EngineState.ASLEEP, False
        asleep_free = self._free_bytes()
        self.measure_wake(awake_free, asleep_free)
        return EngineStartReport(
            engine_id=self.engine_id,
            started=self.started,
            fill_bytes=sum(f["bytes_copied"] for f in fills),
            checked=sum(c["checked"] for c in checks),
            mismatched=tuple(f"rank {c['rank']}: {n}" for c in checks for n in c["mismatched"]),
            sleep_s=sleep_s,
        )

    def start(self) -> EngineStartReport:
        """:meth:`launch` then :meth:`finish_start`."""
        self.launch()
        return self.finish_start()

    def restart(self) -> EngineStartReport:
        """A fresh engine process (after a failure); the engine must hold no request."""
        if self._held:
            raise EngineError(
                f"engine {self.engine_id} still holds {sorted(self._held)}; move them to another engine "
                "(a transition away from it) before restarting it"
            )
        self.close()
        return self.start()

    def close(self) -> None:
        """Kill the engine's process group (teardown; requests held are forgotten)."""
        self.handle.close()
        self.forget_kv_arenas()  # after the workers that mapped them are gone
        self._held.clear()
        self._state, self._resident = EngineState.ASLEEP, False

    def settle(self, raise_errors: bool = False) -> None:
        """Collect a deferred sleep; a failed one marks the engine failed (and raises if asked)."""
        if self.handle.pending != "sleep":
            return
        try:
            self.timings["sleep_s"] = self.handle.wait()
        except (EngineCommandFailed, EngineProcessLost, EngineNoAnswer) as exc:
            self._fail(f"deferred sleep failed: {exc}")  # memory state unknown: end the process, which frees it
            if raise_errors:
                raise EngineError(f"engine {self.engine_id}: {exc}") from None

    def _fail(self, why: str) -> None:
        self.failure = why
        self.handle.close()
        self.forget_kv_arenas()

    def _guard(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except EngineCommandFailed as exc:
            raise EngineError(str(exc)) from None
        except (EngineProcessLost, EngineNoAnswer) as exc:
            self._fail(str(exc))
            raise EngineError(f"{exc}\nengine {self.engine_id} is lost; restart() it") from None

    def _call(self, name: str, timeout_s: float, **kwargs: Any) -> Any:
        self.settle(raise_errors=True)
        if self.failure is not None:
            why = self.failure.splitlines()[0]
            raise EngineError(f"engine {self.engine_id} was lost earlier ({why}); restart() it")
        return self._guard(lambda: self.handle.call(name, timeout_s, **kwargs), name)

    def rpc(self, method: str, *args: Any) -> list[Any]:
        """Run a worker-extension method on every rank (one answer per rank)."""
        return self._call("rpc", self.deadlines.call_s, method=method, args=args)

    # lifecycle --------------------------------------------------------------------------------------------
    def wake(self) -> None:
        if self._state is not EngineState.ASLEEP:
            return
        for s in self.siblings:
            s.settle()  # engines sharing a GPU release their memory first
        self._check_room_to_wake()
        self._resident = True
        self.timings["wake_weights_s"] = self._call("wake_weights", self.deadlines.memory_s)
        self.timings["wake_kv_s"] = self._call("wake_kv", self.deadlines.memory_s)
        self._state = EngineState.AWAKE

    def fill_weights(self) -> FillSummary:
        self._need_awake("fill the weights of")
        t0 = time.perf_counter()
        fills = self.rpc("nitsum_fill_weights")
        self.timings["fill_s"] = time.perf_counter() - t0
        return FillSummary(bytes_copied=sum(f["bytes_copied"] for f in fills), seconds=self.timings["fill_s"])

    def check_weights(self) -> dict[int, list[str]]:
        """Parameters differing, bit for bit, from each rank's shard of the resident store, by GPU."""
        self._need_awake("check the weights of")
        return {self.gpu_ids[r["rank"]]: list(r["mismatched"]) for r in self.rpc("nitsum_fill_mismatches")}

    def sleep(self) -> None:
        if self._held:
            raise EngineError(
                f"engine {self.engine_id} still holds requests {sorted(self._held)}; move or drop them before it sleeps"
            )
        if self.failure is not None or (self._state is EngineState.ASLEEP and not self._resident):
            self._state, self._resident = EngineState.ASLEEP, False  # a lost engine holds no memory any more
            return
        if self.defer_sleep:
            self.settle(raise_errors=True)
            self._guard(lambda: self.handle.send("sleep", self.deadlines.memory_s), "sleep")
        else:
            self.timings["sleep_s"] = self._call("sleep", self.deadlines.memory_s)
        self._state, self._resident = EngineState.ASLEEP, False

    def pause(self) -> None:
        self._need_awake("pause")
        self._state = EngineState.PAUSED

    def resume(self) -> None:
        self._need_awake("resume")
        if self.failure is not None:
            raise EngineError(f"engine {self.engine_id} was lost ({self.failure.splitlines()[0]}); it cannot resume")
        self._state = EngineState.AWAKE

    def _need_awake(self, what: str) -> None:
        if self._state is EngineState.ASLEEP:
            raise EngineError(f"cannot {what} engine {self.engine_id}: it is asleep; wake it first")

    # requests ---------------------------------------------------------------------------------------------
    def request_ids(self) -> tuple[str, ...]:
        return tuple(self._held)

    def add_request(self, request: GenerationRequest) -> None:
        self._need_awake("add a request to")
        self._check_new([request.request_id])
        self._check_fits(request)
        self._add([(request, ())])

    def _check_new(self, ids: Sequence[str]) -> None:
        seen: set[str] = set()
        for rid in ids:
            if rid in self._held or rid in seen:
                raise EngineError(f"request {rid!r} is already on engine {self.engine_id}")
            seen.add(rid)

    def _check_fits(self, request: GenerationRequest) -> None:
        limit = self.started.max_model_len if self.started else self.spec.max_model_len
        total = len(request.prompt_token_ids) + request.max_tokens
        if total > limit:
            raise EngineCapacityError(
                f"request {request.request_id!r} needs {total} tokens (prompt + output); engine "
                f"{self.engine_id} takes at most max_model_len={limit}"
            )

    def _add(
        self,
        items: Sequence[tuple[GenerationRequest, tuple[int, ...]]],
        tickets: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        specs = []
        tickets = tickets or {}
        for req, done in items:
            left = req.max_tokens - len(done)
            if left < 1:
                raise EngineError(f"request {req.request_id!r} already has all its {req.max_tokens} tokens")
            specs.append(
                AddSpec(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids + done,
                    max_tokens=left,
                    top_k=req.top_k,
                    prompt_logprobs=req.prompt_logprobs and not done,
                    kv_transfer_params=tickets.get(req.request_id),
                )
            )
        self._call("add_many", self.deadlines.call_s, requests=specs)  # all or nothing in the engine process
        for req, done in items:
            self._held[req.request_id] = _Held(req, list(done))

    def step(self) -> list[TokenEvent]:
        return self.end_step() if self.begin_step() else []

    def begin_step(self) -> bool:
        """Start one engine step and return at once (``False``: nothing to step); :meth:`end_step` collects its
        tokens. While it runs, the engine takes no other command, so a serving loop can step several engines at
        the same time (wait on :attr:`step_waitable`)."""
        if self._state is not EngineState.AWAKE or not self._held:
            return False
        if self.failure is not None:
            raise EngineError(
                f"engine {self.engine_id} was lost ({self.failure.splitlines()[0]}); its requests "
                f"{sorted(self._held)} wait: move them to another engine (they export from the tokens so far)"
            )
        self.settle(raise_errors=True)
        d = self.deadlines
        self._guard(lambda: self.handle.send("step_events", d.call_s, n=1, step_timeout_s=d.step_s), "step_events")
        return True

    @property
    def stepping(self) -> bool:
        """A step started by :meth:`begin_step` was not collected yet."""
        return self.handle.pending == "step_events"

    @property
    def step_waitable(self) -> Any:
        """The pipe end that becomes readable when the running step ends (for ``multiprocessing.connection.wait``)."""
        return self.handle.conn

    def end_step(self) -> list[TokenEvent]:
        """The tokens of the step started by :meth:`begin_step` (waits for it)."""
        if not self.stepping:
            raise EngineError(f"engine {self.engine_id}: end_step() without a running step (call begin_step first)")
        answer: StepAnswer = self._guard(self.handle.wait, "step_events")
        self.last_engine_s, self.last_step_log = answer.engine_s, answer.step_log
        if answer.steps == 0:
            raise EngineError(
                f"engine {self.engine_id}: the engine process has nothing unfinished, but this side holds "
                f"{sorted(self._held)} (requests lost inside vLLM)"
            )
        events: list[TokenEvent] = []
        for new in answer.events:
            held = self._held.get(new.request_id)
            if held is None:
                raise EngineError(f"engine {self.engine_id} produced tokens for unknown request {new.request_id!r}")
            for i, (token, top) in enumerate(zip(new.token_ids, new.top, strict=True)):
                held.output.append(token)
                done = len(held.output) >= held.request.max_tokens
                events.append(
                    TokenEvent(
                        request_id=new.request_id,
                        index=len(held.output) - 1,
                        token_id=token,
                        top=top,
                        finished=done,
                        engine_id=self.engine_id,
                        prompt_top=new.prompt_top if i == 0 else (),
                    )
                )
            if new.finished != (len(held.output) == held.request.max_tokens):
                raise EngineError(
                    f"engine {self.engine_id}: request {new.request_id!r} has {len(held.output)} of "
                    f"{held.request.max_tokens} tokens but vLLM says finished={new.finished}"
                )
            if new.finished:
                del self._held[new.request_id]
                self._staged.pop(new.request_id, None)
        return events

    def set_step_budget(self, tokens: int | None) -> int:
        """Cap the tokens one step schedules (``None``: the budget it started with, also the most it takes; the
        engine must be between steps); returns the budget now in force."""
        self._need_awake("set its step budget")
        return int(self._call("set_step_budget", self.deadlines.call_s, tokens=tokens))

    def drop_requests(self, request_ids: Sequence[str]) -> None:
        known = [r for r in request_ids if r in self._held]
        for rid in known:
            del self._held[rid]
        self._release_staged([k for r in request_ids if (k := self._staged.pop(r, None))])
        if known and self.failure is None:
            try:
                self._call("abort", self.deadlines.call_s, request_ids=known)
            except EngineError:
                if self.failure is None:
                    raise  # the process lives and refused: its state is unknown, say so
