"""What every stage task shares: the cache policy, result storage on the run's store, retries, state reporting.

Cache policy: the task's inputs (its config section, the fingerprints of its upstream outputs, store root and run
name) + the task's source code. Never the flow run id, so a rerun -- from any machine sharing the store -- finds
the records. Results persist under `<store>/runs/<run>/.prefect/`.

A stage whose output was deleted from the store must run again: the flow asks `output_ok` first and calls the
task with `refresh_cache=True` when the output is gone, so Prefect recomputes and overwrites the stale record.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from prefect.cache_policies import INPUTS, TASK_SOURCE

from storage.paths import RunPaths

STAGE_CACHE = INPUTS + TASK_SOURCE

# Seconds between retries of a task that hit a transient I/O error (growing: store outages, network blips).
# DIFFSAE_IO_RETRY_DELAYS="1,2,4" overrides them (e.g. for outage drills).
IO_RETRY_DELAYS = [float(x) for x in os.environ.get("DIFFSAE_IO_RETRY_DELAYS", "2,5,15,30").split(",") if x]
IO_RETRIES = len(IO_RETRY_DELAYS)

_TRANSIENT_NAMES = {
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ClientOSError",
    "HTTPException",
    "IOException",
    "ResponseStreamingError",
    "IncompleteReadError",
}


def is_transient(exc: BaseException | None) -> bool:
    """An I/O failure worth retrying (network, endpoint down, timeouts), searched along the cause chain."""
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and not isinstance(
            exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: retry only transient I/O failures, never a bug or bad data."""
    exc = state.data if isinstance(getattr(state, "data", None), BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as e:  # noqa: BLE001 - the state's own exception
            exc = e
    return is_transient(exc if isinstance(exc, BaseException) else None)


IO_RETRY = {"retries": IO_RETRIES, "retry_delay_seconds": IO_RETRY_DELAYS, "retry_condition_fn": retry_on_io}


def configured(task: Any, paths: RunPaths, output_ok: bool, results_url: str | None = None) -> Any:
    """The task bound to the run's result storage (or `results_url`, for store-wide stages); forced to recompute
    when its output is missing."""
    from storage.prefect_results import result_storage

    return task.with_options(
        result_storage=result_storage(results_url or paths.prefect_results),
        persist_result=True,
        refresh_cache=not output_ok,
    )


def call_stage(
    task: Any,
    paths: RunPaths,
    output_ok: bool,
    states: dict[str, dict[str, int]],
    name: str,
    *,
    results_url: str | None = None,
    **kwargs: Any,
) -> Any:
    """Run a stage task, count in `states[name]` whether it ran ("Completed") or was "Cached", return its result.

    `results_url`: where its cache records live, when not the run's (a store-wide stage's records are shared by
    every run on the store)."""
    state = configured(task, paths, output_ok, results_url)(return_state=True, **kwargs)
    counts = states.setdefault(name, {})
    counts[state.name] = counts.get(state.name, 0) + 1
    return state.result()


def submit_stage(runner: Any, task: Any, paths: RunPaths, output_ok: bool, **kwargs: Any) -> Any:
    """`call_stage` on a started Prefect task runner (Dask, Ray): submit the configured task, return its future.

    Collect it with `collect_stage`, which does `call_stage`'s bookkeeping."""
    from prefect.utilities.callables import get_call_parameters

    configured_task = configured(task, paths, output_ok)
    return runner.submit(configured_task, get_call_parameters(configured_task.fn, (), kwargs))


def collect_stage(future: Any, states: dict[str, dict[str, int]], name: str) -> Any:
    """Wait for a submitted stage task, count its final state in `states[name]` as `call_stage` does, return its
    result (raises the task's exception when it failed)."""
    future.wait()
    state = future.state
    if not state.is_final():
        future.result()  # the run never reached a final state (e.g. a worker could not unpickle it): raise why
        raise RuntimeError(f"{name}: task run {future.task_run_id} ended in state {state.name}")
    counts = states.setdefault(name, {})
    counts[state.name] = counts.get(state.name, 0) + 1
    return state.result()


def format_states(states: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{k}: " + " ".join(f"{n} {s.lower()}" for s, n in v.items()) for k, v in states.items())


def stable_hash(*parts: Any) -> str:
    """A short content hash of JSON-able parts (dict order does not matter)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def guarded(check: Callable[[], bool]) -> bool:
    """Evaluate an output check; any store error counts as 'missing' (the stage then recomputes)."""
    try:
        return bool(check())
    except Exception:
        return False
