"""What every stage task shares: the stage key, the cache policy, completion markers, retries, state reporting.

One source of truth for "is this stage done": the stage's output on the store. Each stage has a key -- a hash of
its name, everything its output is computed from (config section, upstream keys) and the source of the function
that computes it -- and writes a completion marker at its output location holding that key and its typed result,
last. Prefect's cache key IS that key (`STAGE_CACHE`), its records persist on the store (`<run>/.prefect/`), and
the flow forces a recompute (`refresh_cache`) exactly when the marker does not hold the key; a stage whose marker
holds the key returns the marker's result without recomputing, so a lost Prefect record costs nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import threading
from typing import Any, Callable, NamedTuple, TypeVar

from prefect.cache_policies import CacheKeyFnPolicy

from storage.context import RunContext
from storage.prefect_results import result_storage
from storage.store import Store


def _stage_key(_task_ctx: Any, parameters: dict[str, Any]) -> str:
    return str(parameters["key"])


# Prefect's cache key of a stage task = the task's `key` parameter, the stage key its marker holds.
STAGE_CACHE = CacheKeyFnPolicy(cache_key_fn=_stage_key)


def stable_hash(*parts: Any) -> str:
    """A short content hash of JSON-able parts (dict order does not matter)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def code_version(*functions: Callable[..., Any]) -> str:
    """Hash of the source of the functions that compute a stage: editing them recomputes the stage."""
    return stable_hash(*(inspect.getsource(f) for f in functions))


def stage_key(stage: str, compute: Callable[..., Any], *inputs: Any) -> str:
    """`<stage>-<hash>`: the stage's name, what its output depends on, and the source of `compute`."""
    return f"{stage}-{stable_hash(stage, code_version(compute), *inputs)}"


R = TypeVar("R", bound=NamedTuple)


def read_marker(store: Store, url: str, key: str, result: type[R]) -> R | None:
    """The stage result recorded in the marker at `url` when it holds `key`, else None (missing, unreadable,
    another key: the stage must run)."""
    try:
        rec = store.read_json(url)
    except Exception:  # noqa: BLE001 - missing or unreadable: not done
        return None
    if not isinstance(rec, dict) or rec.get("key") != key:
        return None
    try:
        return result(**{f: rec[f] for f in result._fields})
    except KeyError:
        return None


def write_marker(store: Store, url: str, result: NamedTuple) -> None:
    """Write the stage's marker -- LAST, after every output it vouches for."""
    store.write_json(url, result._asdict())


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


_INTERRUPTED = threading.Event()


def interrupt_handler(signum: int, frame: Any) -> None:
    """SIGINT handler for `diffsae run`: remember the interrupt, then raise KeyboardInterrupt as Python's default
    handler does. Remembered because the exception can be lost on its way out (seen: a Ctrl-C that landed while fast
    extraction shards ran left no trace and the run went on to train); the next stage boundary re-raises it."""
    _INTERRUPTED.set()
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Re-raise a Ctrl-C that `interrupt_handler` saw (a no-op unless it is installed and was hit)."""
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt


def configured(task: Any, ctx: RunContext, done: bool, results_url: str | None = None) -> Any:
    """The task bound to the run's result storage (or `results_url`, for store-wide stages); forced to recompute
    when its output is not on the store."""
    return task.with_options(
        result_storage=result_storage(results_url or ctx.paths.prefect_results, ctx.endpoint_url),
        persist_result=True,
        refresh_cache=not done,
    )


def call_stage(
    task: Any,
    ctx: RunContext,
    done: bool,
    states: dict[str, dict[str, int]],
    name: str,
    *,
    results_url: str | None = None,
    **kwargs: Any,
) -> Any:
    """Run a stage task, count in `states[name]` whether it ran ("Completed") or was "Cached", return its result.

    `done`: the stage's marker holds the key (else Prefect must recompute, whatever record it holds);
    `results_url`: where its cache records live, when not the run's (a store-wide stage's records are shared by
    every run on the store)."""
    raise_if_interrupted()
    state = configured(task, ctx, done, results_url)(ctx=ctx, return_state=True, **kwargs)
    raise_if_interrupted()
    counts = states.setdefault(name, {})
    counts[state.name] = counts.get(state.name, 0) + 1
    return state.result()


def submit_stage(runner: Any, task: Any, ctx: RunContext, done: bool, **kwargs: Any) -> Any:
    """`call_stage` on a started Prefect task runner (Dask, Ray): submit the configured task, return its future.

    Collect it with `collect_stage`, which does `call_stage`'s bookkeeping."""
    from prefect.utilities.callables import get_call_parameters

    configured_task = configured(task, ctx, done)
    return runner.submit(configured_task, get_call_parameters(configured_task.fn, (), {"ctx": ctx, **kwargs}))


def collect_stage(future: Any, states: dict[str, dict[str, int]], name: str) -> Any:
    """Wait for a submitted stage task, count its final state in `states[name]` as `call_stage` does, return its
    result (raises the task's exception when it failed)."""
    future.wait()
    raise_if_interrupted()
    state = future.state
    if not state.is_final():
        future.result()  # the run never reached a final state (e.g. a worker could not unpickle it): raise why
        raise RuntimeError(f"{name}: task run {future.task_run_id} ended in state {state.name}")
    counts = states.setdefault(name, {})
    counts[state.name] = counts.get(state.name, 0) + 1
    return state.result()


def format_states(states: dict[str, dict[str, int]]) -> str:
    return ", ".join(f"{k}: " + " ".join(f"{n} {s.lower()}" for s, n in v.items()) for k, v in states.items())
