"""Fixtures for the interop tests: one ``p2pacs serve`` holding a mixed set of real files."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from interop_helpers import (
    RetrievedAll,
    Stored,
    by_syntax,
    movescu,
    read_folder,
    select_files,
    storescu,
)
from interop_peers import P2pacsServe, StoreSCP, WireSCP, free_tcp_port, require_tools

DEST_AET = "STORESCP"  # the C-MOVE destination registered in the served site


def _folders(root: Path, files: dict[str, Path], groups: dict[str, list[str]]) -> dict[str, Path]:
    """One folder per transfer syntax (storescu proposes one compressed syntax per run)."""
    out = {}
    for i, (ts, uids) in enumerate(sorted(groups.items())):
        folder = root / f"ts{i:02d}"
        folder.mkdir(parents=True)
        for uid in uids:
            src = files[uid]
            dst = folder / f"{len(list(folder.iterdir())):04d}-{src.name}"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
        out[ts] = folder
    return out


def _send_folder(aet: str, port: int, ts: str, folder: Path) -> dict[str, str]:
    """storescu +sd on one folder; SOP Instance UID -> the status storescu reported."""
    paths = sorted(folder.iterdir())
    uids = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    result = storescu(aet, port, ts, [folder], scan=True)
    statuses = {uids[p]: "not sent" for p in paths}
    for path, status in result.items():
        if path in uids:
            statuses[uids[path]] = status
    return statuses


@pytest.fixture(scope="module")
def stored(
    tmp_path_factory: pytest.TempPathFactory, pydicom_files: list[Path], generated_dir: Path
) -> Iterator[Stored]:
    """A served site holding the generated studies and pydicom's files, sent by storescu; a
    bare pynetdicom SCP got the same sends first (under both negotiation orders, see WireSCP),
    to record the bytes on the wire."""
    require_tools("storescu", "storescp", "dcmdump")
    root = tmp_path_factory.mktemp("interop")
    files = select_files(sorted(generated_dir.glob("*.dcm")) + pydicom_files, root / "reuid")
    headers = {u: pydicom.dcmread(p, stop_before_pixels=True) for u, p in files.items()}
    folders = _folders(root / "send", files, by_syntax(headers))
    wire: dict[str, dict[str, bytes]] = {}
    for requestor_order in (False, True):
        with WireSCP(requestor_order=requestor_order) as wire_scp:
            for ts, folder in sorted(folders.items()):
                _send_folder(wire_scp.aet, wire_scp.port, ts, folder)
        for uid, (ts, data) in wire_scp.received.items():
            wire.setdefault(uid, {})[ts] = data
    dest_port = free_tcp_port()
    dest = {DEST_AET: f"127.0.0.1:{dest_port}"}
    with P2pacsServe(root / "site", "P2PACS", destinations=dest) as serve:
        statuses: dict[str, str] = {}
        for ts, folder in sorted(folders.items()):
            statuses.update(_send_folder(serve.aet, serve.port, ts, folder))
        sent = {u for u, s in statuses.items() if s == "Success"}
        yield Stored(serve, DEST_AET, dest_port, files, headers, wire, sent, statuses)


@pytest.fixture(scope="module")
def retrieved(stored: Stored, tmp_path_factory: pytest.TempPathFactory) -> RetrievedAll:
    """Everything the site acknowledged, C-MOVEd (by study) to dcmtk storescp: SOP Instance
    UID -> (transfer syntax, dataset bytes) as received, and movescu's output."""
    require_tools("movescu")
    out = tmp_path_factory.mktemp("retrieved")
    studies = sorted(stored.values("StudyInstanceUID"))
    with StoreSCP(out, stored.dest_aet, stored.dest_port):
        log = movescu(stored, "STUDY", stored.dest_aet, "StudyInstanceUID=" + "\\".join(studies))
    return RetrievedAll(read_folder(out), log)


@pytest.fixture
def move_dest(stored: Stored, tmp_path: Path) -> Iterator[StoreSCP]:
    """A fresh dcmtk storescp at the site's registered C-MOVE destination."""
    with StoreSCP(tmp_path / "moved", stored.dest_aet, stored.dest_port) as scp:
        yield scp
