"""Fixtures for interop tests: one ``p2pacs serve`` holding a mixed set of real files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from interop_helpers import Stored, dataset_bytes
from peers import P2pacsServe, StoreSCP, require_tools, run_dcmtk

# storescu proposes a compressed syntax only when told to (one per run)
PROPOSE = {
    "1.2.840.10008.1.2.4.50": ["-xy"],
    "1.2.840.10008.1.2.4.51": ["-xx"],
    "1.2.840.10008.1.2.4.57": ["-xs"],
    "1.2.840.10008.1.2.4.70": ["-xs"],
    "1.2.840.10008.1.2.4.80": ["-xt"],
    "1.2.840.10008.1.2.4.81": ["-xu"],
    "1.2.840.10008.1.2.4.90": ["-xv"],
    "1.2.840.10008.1.2.4.91": ["-xw"],
    "1.2.840.10008.1.2.5": ["-xr"],
    "1.2.840.10008.1.2.1.99": ["-xd"],
}


def _dcmtk_reads(path: Path) -> bool:
    """Some of pydicom's test files are deliberately malformed; dcmtk refuses to send those."""
    proc = run_dcmtk("dcmdump", "-M", path, check=False)
    return proc.returncode == 0 and not proc.stderr.strip()


def _one_per_uid(paths: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        if not _dcmtk_reads(p):
            continue
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.setdefault(str(ds.SOPInstanceUID), p)
    return out


@pytest.fixture(scope="module")
def stored(
    tmp_path_factory: pytest.TempPathFactory, pydicom_files: list[Path], generated_dir: Path
) -> Iterator[Stored]:
    """A served site holding the generated studies and pydicom's files, sent by storescu."""
    require_tools("storescu", "storescp", "dcmdump")
    root = tmp_path_factory.mktemp("interop")
    files = _one_per_uid(sorted(generated_dir.glob("*.dcm")) + pydicom_files)
    headers = {u: pydicom.dcmread(p, stop_before_pixels=True) for u, p in files.items()}
    groups: dict[str, list[Path]] = {}
    for uid, ds in headers.items():
        groups.setdefault(str(ds.file_meta.TransferSyntaxUID), []).append(files[uid])
    with StoreSCP(root / "wire", "WIRE") as wire_scp:
        for ts, paths in sorted(groups.items()):
            _send(wire_scp.aet, wire_scp.port, ts, paths, check=False)
    wire = _received(root / "wire")
    with StoreSCP(root / "moved") as scp:
        dest = {scp.aet: f"127.0.0.1:{scp.port}"}
        with P2pacsServe(root / "site", "P2PACS", destinations=dest) as serve:
            for ts, paths in sorted(groups.items()):
                _send(serve.aet, serve.port, ts, paths, check=True)
            yield Stored(serve, scp, files, headers, wire)


def _send(aet: str, port: int, ts: str, paths: list[Path], *, check: bool) -> None:
    # -R: only the contexts the files need; the -x flag makes storescu propose the files'
    # own compressed syntax, so they are sent as they are
    run_dcmtk(
        "storescu",
        "-aet",
        "STORESCU",
        "-aec",
        aet,
        "-R",
        *PROPOSE.get(ts, []),
        "-nh",
        "--max-send-pdu",
        "131072",
        "127.0.0.1",
        port,
        *paths,
        check=check,
    )


def _received(folder: Path) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> dataset bytes of the files storescp wrote (bit-preserving)."""
    out = {}
    for path in folder.iterdir():
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = (str(ds.file_meta.TransferSyntaxUID), dataset_bytes(data))
    return out
