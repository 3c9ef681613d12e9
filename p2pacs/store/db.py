"""One LMDB environment per site, with one writer thread that group-commits.

LMDB allows one write transaction at a time, and a write transaction may only be used on the
thread that opened it (py-lmdb docs). pynetdicom runs a thread per association and the federation
code runs on asyncio, so every write is a *job* handed to a single writer thread. The writer folds
all queued jobs into one transaction and commits once: one fsync durably covers many instances
(group commit), which is what makes durable ingest fast. A job's future resolves only after the
commit, so "success" always means "on disk".

Each job runs in a nested transaction, so one failing job (bad input, full map) is rolled back
alone and the rest of the group still commits.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from p2pacs import const, failpoints
from p2pacs.errors import StoreError, StoreFullError

__all__ = ["SiteDB", "WriteJob"]

log = logging.getLogger(__name__)

T = TypeVar("T")
WriteJob = Callable[[lmdb.Transaction], T]


@dataclass(slots=True)
class _Job:
    fn: Callable[[lmdb.Transaction], Any]
    future: Future[Any]
    weight: int


_STOP = object()


class SiteDB:
    """The site's LMDB environment: named sub-databases, shared reads, one writer thread."""

    def __init__(self, path: Path, *, map_size: int = const.DEFAULT_MAP_SIZE, sync: bool = True):
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self.env = lmdb.open(
                str(path),
                map_size=map_size,
                max_dbs=const.MAX_DBS,
                sync=sync,
                metasync=sync,
                max_readers=512,
                readahead=False,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the site database at {path}: {exc}") from exc
        self._dbs: dict[str, Any] = {}
        self._queue: queue.SimpleQueue[_Job | object] = queue.SimpleQueue()
        self._closed = False
        self.commits = 0  # write transactions committed (counted by the writer thread only)
        self.jobs_committed = 0  # jobs in them: jobs / commits is the mean group-commit size
        self._writer = threading.Thread(
            target=self._run, name=f"lmdb-writer:{path.name}", daemon=True
        )
        self._writer.start()

    def db(self, name: str, *, dupsort: bool = False) -> Any:
        """A named sub-database handle, created on first use (handles are valid in every thread)."""
        handle = self._dbs.get(name)
        if handle is None:
            handle = self.env.open_db(name.encode(), dupsort=dupsort, create=True)
            self._dbs[name] = handle
        return handle

    def read(self) -> lmdb.Transaction:
        """A read-only transaction; use as a context manager and keep it short."""
        return self.env.begin(write=False, buffers=False)

    def submit(self, fn: WriteJob[T], weight: int = 0) -> Future[T]:
        """Queue a write job; the future resolves after the transaction holding it is durable."""
        if self._closed:
            raise StoreError("the site database is closed")
        future: Future[T] = Future()
        self._queue.put(_Job(fn, future, weight))
        return future

    def write(self, fn: WriteJob[T], weight: int = 0, timeout: float = const.WRITE_TIMEOUT) -> T:
        """Run a write job and wait until it is durable."""
        return self.submit(fn, weight).result(timeout)

    def stat(self) -> dict[str, int]:
        info = self.env.info()
        stat = self.env.stat()
        return {
            "map_size": int(info["map_size"]),
            "used_bytes": int((info["last_pgno"] + 1) * stat["psize"]),
            "page_size": int(stat["psize"]),
            # the group commit: jobs waiting for the writer, transactions and jobs committed
            "write_queue": self._queue.qsize(),
            "commits": self.commits,
            "jobs_committed": self.jobs_committed,
        }

    def close(self) -> None:
        """Finish queued writes, stop the writer and close the environment."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._writer.join()
        self.env.close()

    # --- writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            assert isinstance(first, _Job)
            batch = [first]
            weight = first.weight
            stop = False
            while (
                len(batch) < const.GROUP_COMMIT_MAX_JOBS and weight < const.GROUP_COMMIT_MAX_BYTES
            ):
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                assert isinstance(nxt, _Job)
                batch.append(nxt)
                weight += nxt.weight
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        """Run a batch in one transaction; on a full map, retry each job alone so most survive."""
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        results: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            failpoints.hit("store.commit", StoreError)
        except StoreError as exc:
            self._fail(live, exc)
            return
        try:
            with self.env.begin(write=True) as txn:
                for job in live:
                    results.append(self._run_nested(txn, job))
        except lmdb.MapFullError:
            if len(live) > 1:
                for job in live:
                    self._commit_alone(job)
                return
            self._fail(live, self._full_error())
            return
        except lmdb.Error as exc:
            self._fail(live, StoreError(f"LMDB write failed: {exc}"))
            return
        self.commits += 1
        self.jobs_committed += len(live)
        for job, result, error in results:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)

    def _commit_alone(self, job: _Job) -> None:
        try:
            with self.env.begin(write=True) as txn:
                _, result, error = self._run_nested(txn, job)
        except lmdb.MapFullError:
            job.future.set_exception(self._full_error())
            return
        except lmdb.Error as exc:
            job.future.set_exception(StoreError(f"LMDB write failed: {exc}"))
            return
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)

    def _run_nested(
        self, txn: lmdb.Transaction, job: _Job
    ) -> tuple[_Job, Any, BaseException | None]:
        """Run one job in a child transaction: its failure rolls back only its own writes."""
        try:
            with self.env.begin(write=True, parent=txn) as nested:
                return job, job.fn(nested), None
        except lmdb.MapFullError:
            raise
        except lmdb.Error as exc:
            return job, None, StoreError(f"LMDB refused a write: {exc}")
        except Exception as exc:  # a job's own failure is reported to its caller, not the writer
            return job, None, exc

    def _full_error(self) -> StoreFullError:
        map_size = self.env.info()["map_size"]
        return StoreFullError(
            f"the site database at {self.path} is full (map_size {map_size} bytes); "
            "nothing already stored was lost: raise store.map_size in the site config and restart"
        )

    @staticmethod
    def _fail(jobs: list[_Job], error: BaseException) -> None:
        for job in jobs:
            job.future.set_exception(error)
