"""Task runners for `extract.runner: dask | ray`: where the extraction and attribution shard tasks run when not in
the flow itself.

`task_runner(extract)` is a Prefect task runner (prefect-dask / prefect-ray) on an existing cluster
(`extract.cluster_address`) or on a local one it starts and stops (`extract.n_workers` processes, one thread each).
Used as a context manager inside a flow run, with `tasks.common.submit_stage` / `collect_stage`:

    with on_cluster(cfg.extract) as runner:
        futures = [submit_stage(runner, task, paths, ok, **kwargs) for ...]

Workers unpickle the tasks by reference to this project's modules, so every worker needs the same environment
(this package installed, the models reachable at the same paths or hub ids, store credentials in its env).
Module-level caches (tasks.extract's lru_cache'd model pair) then live once per worker process.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse

from diffsae.config import ExtractConfig

# Local clusters: one torch/BLAS thread per worker process (n_workers processes share the machine's cores).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def task_runner(extract: ExtractConfig) -> Any:
    """The Prefect task runner of `extract.runner` (not started; enter it as a context manager)."""
    if extract.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if extract.cluster_address:
            return DaskTaskRunner(address=extract.cluster_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": extract.n_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "env": ONE_THREAD,
                "silence_logs": logging.WARNING,
            }
        )
    if extract.runner == "ray":
        from prefect_ray import RayTaskRunner

        if extract.cluster_address:
            return RayTaskRunner(address=extract.cluster_address)
        return RayTaskRunner(
            init_kwargs={
                "num_cpus": extract.n_workers,
                "include_dashboard": False,
                "runtime_env": {"env_vars": ONE_THREAD},
            }
        )
    raise ValueError(f"runner {extract.runner!r} has no task runner (local runs in the flow)")


@contextmanager
def workers_report_to_this_api(cluster_address: str | None) -> Iterator[None]:
    """Make workers report their task runs to the flow's Prefect API.

    Prefect ships its settings with every submitted task. Without PREFECT_API_URL the flow uses a temporary local
    server, and each worker would start a temporary server of its own: pin the flow's server URL instead. Workers
    on other machines cannot reach that server; they need PREFECT_API_URL set to a server they can reach."""
    from prefect import get_client
    from prefect.context import FlowRunContext
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if not url:
        ctx = FlowRunContext.get()
        url = str((ctx.client if ctx is not None else get_client(sync_client=True)).api_url)
    if cluster_address and urlparse(url).hostname in ("127.0.0.1", "localhost", "::1"):
        # `diffsae run` sets PREFECT_API_URL to the temporary server it owns (flows/server.py), on this machine only
        get_logger("diffsae.runners").warning(
            "extract: workers of %s must reach this flow's Prefect server at %s, which listens on this machine "
            "only (set PREFECT_API_URL to a Prefect server for a cluster on other machines)",
            cluster_address,
            url,
        )
    with temporary_settings({PREFECT_API_URL: url}):
        yield


@contextmanager
def on_cluster(extract: ExtractConfig) -> Iterator[Any]:
    """A started task runner for `extract` whose workers report to this flow's Prefect API."""
    with workers_report_to_this_api(extract.cluster_address), task_runner(extract) as runner:
        yield runner
