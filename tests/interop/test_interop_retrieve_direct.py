"""dcmtk movescu and getscu against ``p2pacs serve`` (gateway workers): the direct C-STORE path.

The gateway sends each stored instance and reads its C-STORE-RSP in the sending thread
(``gateway/rawsend.py``), to dcmtk storescp for a C-MOVE and to getscu for a C-GET. What
arrives must be the stored bytes exactly; a C-CANCEL from movescu part-way through must end the
move with Cancel, with what was sent before it intact, and leave the site serving the next move
whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from p2pacs.samples import generate_instances

from interop_helpers import dataset_bytes, read_folder, storescu
from interop_peers import P2pacsServe, StoreSCP, free_tcp_port, require_tools, run_dcmtk

pytestmark = pytest.mark.interop

DEST = "STORESCP"
INSTANCES = 60  # 128 KiB each: enough that a cancel after 5 responses lands well before the end


@dataclass
class Served:
    serve: P2pacsServe
    dest_port: int
    study: str
    expected: dict[str, bytes]  # SOP Instance UID -> dataset bytes as stored


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    require_tools("storescu", "storescp", "movescu", "getscu")
    root = tmp_path_factory.mktemp("retrieve-direct")
    files = generate_instances(
        root / "src", studies=1, series_per_study=2, instances_per_series=INSTANCES // 2,
        rows=256, columns=256, implicit_vr_every=0,
    )  # fmt: skip
    expected = {}
    for f in files:
        expected[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = dataset_bytes(
            f.read_bytes()
        )
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    dest_port = free_tcp_port()
    with P2pacsServe(root / "site", destinations={DEST: f"127.0.0.1:{dest_port}"}) as serve:
        sent = storescu(serve.aet, serve.port, ExplicitVRLittleEndian, [root / "src"], scan=True)
        assert sorted(sent.values()) == ["Success"] * len(files), sent
        yield Served(serve, dest_port, study, expected)


def _movescu(served: Served, *extra: str) -> str:
    proc = run_dcmtk(
        "movescu", "-v", "-S", "-aet", "MOVESCU", "-aec", served.serve.aet, "-aem", DEST,
        *extra, "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={served.study}",
        "127.0.0.1", served.serve.port, check=False,
    )  # fmt: skip
    return proc.stdout + proc.stderr + f"\nexit {proc.returncode}"


def _arrived(folder: Path) -> dict[str, bytes]:
    got = read_folder(folder)
    assert {ts for ts, _ in got.values()} <= {ExplicitVRLittleEndian}
    return {uid: data for uid, (_, data) in got.items()}


def test_movescu_study_arrives_byte_identical(served: Served, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "moved", DEST, served.dest_port) as dest:
        out = _movescu(served)
        got = _arrived(dest.out_dir)
    assert "exit 0" in out, out
    assert got == served.expected


def test_movescu_cancel_midway_is_answered(served: Served, tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "cancelled", DEST, served.dest_port) as dest:
        out = _movescu(served, "--cancel", "5")
        got = _arrived(dest.out_dir)
    assert "exit 0" in out, out
    assert "Cancel" in out.split("Received Final Move Response", 1)[-1], out
    assert 5 <= len(got) < len(served.expected), out
    assert all(served.expected[uid] == data for uid, data in got.items())
    # the site keeps serving: the next move of the study is whole
    with StoreSCP(tmp_path / "again", DEST, served.dest_port) as dest:
        out = _movescu(served)
        again = _arrived(dest.out_dir)
    assert "exit 0" in out, out
    assert again == served.expected


def test_getscu_study_arrives_byte_identical(served: Served, tmp_path: Path) -> None:
    out_dir = tmp_path / "got"
    out_dir.mkdir()
    run_dcmtk(
        "getscu", "-S", "-aet", "GETSCU", "-aec", served.serve.aet, "+B", "-od", out_dir,
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={served.study}",
        "127.0.0.1", served.serve.port,
    )  # fmt: skip
    assert _arrived(out_dir) == served.expected
