"""Orthanc as a plain process for the benchmarks that measure p2pacs against it, and the
stopping of any process a benchmark started (by its PID, terminate then kill)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "interop"))

from interop_peers import (  # type: ignore[import-not-found,unused-ignore]
    free_tcp_port,
    peer_env,
    tool_path,
    wait_for_port,
)

START_TIMEOUT = 60.0  # seconds for Orthanc to answer its REST API


def stop_process(proc: subprocess.Popen[Any] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


@contextmanager
def orthanc_process(
    work: Path, settings: dict[str, Any]
) -> Iterator[tuple[int, str, subprocess.Popen[Any]]]:
    """Orthanc on loopback with its storage in ``work``, at the settings every benchmark uses
    (no compression, no plugins, 128 KiB PDUs) plus ``settings``; yields (DICOM port, REST base
    URL, process) once both answer, and stops it after."""
    port, http = free_tcp_port(), free_tcp_port()
    config = {
        "Name": "bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "DicomCheckCalledAet": False,
        "AuthenticationEnabled": False,
        "StorageCompression": False,
        "Plugins": [],
        "MaximumPduLength": 131072,
        **settings,
    }
    (work / "orthanc.json").write_text(json.dumps(config, indent=1))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen(
        [tool_path("Orthanc"), str(work / "orthanc.json")],
        env=peer_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                urllib.request.urlopen(url + "/system", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start; see {log.name}") from None
                time.sleep(0.1)  # polling a REST port until it answers: no event to wait on
        wait_for_port(port, proc)
        yield port, url, proc
    finally:
        stop_process(proc)
        log.close()
