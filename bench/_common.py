"""Helpers shared by the ingest benchmarks: the test instances and a durable plain write."""

from __future__ import annotations

import os
import time
from pathlib import Path

from p2pacs.samples import generate_bench_instances


def bench_files(out_dir: Path, n: int, *, seed: int = 0) -> list[Path]:
    """``n`` generated ~0.5 MB CT instances (deterministic for a seed)."""
    return generate_bench_instances(out_dir, n, seed=seed)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes | memoryview) -> None:
    """Write a new file and fsync it (the caller fsyncs the folder once at the end)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
