"""Connecting to a Dask cluster, and running a job on it so that a lost worker can never hang it.

Why a watchdog: ``xgboost.dask`` pins its training tasks to the workers that hold the data. When one
of them dies (out of memory, a pre-empted node) and its nanny restarts it under a new address, the
training waits for the old address forever (dmlc/xgboost#9419 and #9420, still how 3.2 behaves).
``guarded`` runs a job in a helper thread and watches the scheduler's worker set: if a worker that was
there when the job started leaves, the job is abandoned and ``WorkerLostError`` names the worker, so
the command fails with a message and exit code instead of hanging. Nothing is retried automatically:
a boosting run that lost a worker's rows would silently learn from part of the data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

LOCAL = "local"
# A LocalCluster's shape on this project's reference machine (2 cores): two worker processes of one
# thread each, so xgboost's histogram building uses both cores and each worker is a separate process
# (a crash in one does not take the other, or the client, with it).
LOCAL_WORKERS, LOCAL_THREADS = 2, 1
CONNECT_TIMEOUT_S = 30
# How long a stalled collective (a peer gone mid-allreduce) waits before xgboost gives up on the
# surviving workers; the watchdog reports the lost worker long before (assumption: 2 minutes is far
# beyond any healthy allreduce of masml's histograms).
COLLECTIVE_TIMEOUT_S = 120
POLL_S = 0.5


class ClusterError(RuntimeError):
    """The cluster cannot be reached or cannot run the job; the message says which and why."""


class WorkerLostError(ClusterError):
    """A worker left the cluster while a job that depends on it was running."""


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``local`` / ``local:N`` (a LocalCluster of N worker processes) or a scheduler address."""
    spec = spec.strip()
    if spec == LOCAL:
        return LOCAL, LOCAL_WORKERS
    if spec.startswith(f"{LOCAL}:"):
        n = spec.split(":", 1)[1]
        if not n.isdigit() or int(n) < 1:
            raise ClusterError(f"--cluster {spec!r}: expected local:N with N a number of workers >= 1")
        return LOCAL, int(n)
    if "://" in spec and spec.split("://", 1)[0] in ("tcp", "tls", "inproc", "ucx", "ws", "wss"):
        return spec, None
    raise ClusterError(
        f"--cluster {spec!r}: expected 'local', 'local:N' or a scheduler address such as tcp://host:8786"
    )


@contextmanager
def connect(spec: str = LOCAL, timeout_s: float = CONNECT_TIMEOUT_S) -> Iterator[Any]:
    """A ``dask.distributed.Client`` for ``spec``; a LocalCluster is started and stopped with it."""
    from dask.distributed import Client, LocalCluster

    address, n_workers = parse_spec(spec)
    if address == LOCAL:
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=LOCAL_THREADS, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR,
        )  # fmt: skip
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = Client(address, timeout=timeout_s)
    except (OSError, TimeoutError) as err:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} within {timeout_s:g} s ({err}); start it "
            "with `dask scheduler` and its workers with `dask worker ADDRESS`, or use --cluster local"
        ) from None
    try:
        if not worker_addresses(client):
            raise ClusterError(f"the Dask scheduler at {address} has no workers: start `dask worker ADDRESS`")
        yield client
    finally:
        client.close()


def worker_addresses(client) -> set[str]:
    """The workers the scheduler knows right now (asked, not cached: the client's copy lags by ~2 s)."""
    return set(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.workers)))


def threads_per_worker(client) -> int:
    info = client.scheduler_info(n_workers=-1)["workers"]
    return max(1, min(int(w.get("nthreads", 1)) for w in info.values())) if info else 1


def guarded(client, job: Callable[[], T], what: str, timeout_s: float | None = None) -> T:
    """Run ``job()`` (which submits work to ``client``) and return its result, or raise
    ``WorkerLostError`` as soon as a worker present at the start leaves, or ``ClusterError`` after
    ``timeout_s`` seconds. The abandoned job's tasks are released when the caller closes the client."""
    before = worker_addresses(client)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = job()
        except BaseException as err:  # handed to the caller's thread below
            box["error"] = err

    thread = threading.Thread(target=target, name=f"masml-{what}", daemon=True)
    started = time.monotonic()
    thread.start()
    while True:
        thread.join(POLL_S)
        if not thread.is_alive():
            break
        try:
            lost = before - worker_addresses(client)
        except Exception as err:  # the scheduler itself is gone
            raise ClusterError(f"{what}: lost contact with the Dask scheduler ({err})") from None
        if lost:
            raise WorkerLostError(
                f"{what}: worker {', '.join(sorted(lost))} left the cluster while the job was running "
                f"(after {time.monotonic() - started:.0f} s). xgboost's dask training cannot continue "
                "without it (dmlc/xgboost#9419), so the job was stopped rather than left to hang; "
                "nothing was written. Check the worker's memory limit and log, then run the command again."
            )
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise ClusterError(f"{what}: no result after {timeout_s:.0f} s; the job was stopped")
    if "error" in box:
        raise box["error"]
    return box["value"]
