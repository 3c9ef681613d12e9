"""Helpers for the interop tests (a unique module name: ``conftest`` is taken many times)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from interop_peers import P2pacsServe, run_dcmtk

# storescu 3.6.7 proposes a compressed syntax only when told to; with -R it proposes, per SOP
# class, just what the files need, so each file goes in its own syntax (one flag per run)
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}

# getscu 3.6.7 has no "accept all" flag: it accepts one preferred syntax (+x..) plus the
# uncompressed ones, so each stored syntax is fetched with its own preference
GETSCU_PREFER = {
    **{ts: "+" + flag[1:] for ts, flag in STORESCU_PROPOSE.items()},
    "1.2.840.10008.1.2.1": "+xe",
}


def dataset_bytes(data: bytes) -> bytes:
    """The bytes after a Part-10 file's meta information (group 0002, explicit VR LE)."""
    assert data[128:132] == b"DICM", "not a Part-10 file"
    pos = 132
    while data[pos : pos + 2] == b"\x02\x00":
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos:]


def read_folder(folder: Path) -> dict[str, tuple[str, bytes]]:
    """SOP Instance UID -> (transfer syntax, dataset bytes) of every Part-10 file in a folder."""
    out = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = (str(ds.file_meta.TransferSyntaxUID), dataset_bytes(data))
    return out


@dataclass
class Stored:
    """What storescu sent to the served site, and what the wire carried."""

    serve: P2pacsServe
    dest_aet: str  # a C-MOVE destination registered in the site's [dicom] destinations
    dest_port: int
    files: dict[str, Path]  # SOP Instance UID -> the file sent
    headers: dict[str, pydicom.Dataset]
    wire: dict[str, dict[str, bytes]]  # syntax -> dataset bytes the reference SCPs received
    sent: set[str] = field(default_factory=set)  # UIDs storescu reported stored at the site
    statuses: dict[str, str] = field(default_factory=dict)  # UID -> storescu's report

    def uids(self, **where: str) -> set[str]:
        """UIDs of the instances the site acknowledged whose attributes equal ``where``."""
        return {
            u
            for u in self.sent
            if all(str(self.headers[u].get(k, "")) == v for k, v in where.items())
        }

    def same_as_sent(self, uid: str, got: tuple[str, bytes]) -> bool:
        """Whether ``(syntax, dataset bytes)`` are what storescu sent in that syntax."""
        return self.wire.get(uid, {}).get(got[0]) == got[1]

    def values(self, keyword: str, **where: str) -> set[str]:
        return {str(self.headers[u].get(keyword, "")) for u in self.uids(**where)}


def dcmtk_reads(path: Path) -> bool:
    """Some of pydicom's test files are deliberately malformed; dcmtk refuses to send those."""
    proc = run_dcmtk("dcmdump", "-M", path, check=False)
    return proc.returncode == 0 and not proc.stderr.strip()


def select_files(paths: list[Path], out_dir: Path) -> dict[str, Path]:
    """One file per SOP Instance UID; a compressed file whose UID is taken by another file
    (pydicom ships MR_small in many syntaxes under one UID) is copied with a new UID, pixel
    data untouched, so every compressed test file is sent as its own instance."""
    out: dict[str, Path] = {}
    later: list[tuple[Path, pydicom.Dataset]] = []
    for path in paths:
        if not dcmtk_reads(path):
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(ds.SOPInstanceUID)
        if uid not in out:
            out[uid] = path
        elif ds.file_meta.TransferSyntaxUID.is_encapsulated:
            later.append((path, ds))
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, header in later:
        full = pydicom.dcmread(path)
        uid = generate_uid(entropy_srcs=[path.name, str(header.SOPInstanceUID)])
        full.SOPInstanceUID = uid
        full.file_meta.MediaStorageSOPInstanceUID = uid
        copy = out_dir / f"reuid-{path.name}"
        full.save_as(copy, enforce_file_format=True)
        out[str(uid)] = copy
    return out


def by_syntax(headers: dict[str, pydicom.Dataset]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for uid, ds in sorted(headers.items()):
        groups.setdefault(str(ds.file_meta.TransferSyntaxUID), []).append(uid)
    return groups


_SENDING = re.compile(r"Sending file: (.+)$")
_RESPONSE = re.compile(r"Received Store Response \((.+)\)")


def storescu(
    aet: str, port: int, syntax: str, paths: list[Path], *, scan: bool = False
) -> dict[Path, str]:
    """Send files (or, with ``scan``, folders: ``+sd +r``) with dcmtk storescu proposing the
    files' own syntax; file -> the status storescu reports for it (``Success``, ``Warning``,
    an error name, or ``not sent``)."""
    proc = run_dcmtk(
        "storescu",
        "-v",
        "-aet",
        "STORESCU",
        "-aec",
        aet,
        "-R",
        *([STORESCU_PROPOSE[syntax]] if syntax in STORESCU_PROPOSE else []),
        "-nh",
        *(["+sd", "+r"] if scan else []),
        "--max-send-pdu",
        "131072",
        "127.0.0.1",
        port,
        *paths,
        check=False,
    )
    result = {} if scan else dict.fromkeys(paths, "not sent")
    current: Path | None = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if m := _SENDING.search(line):
            current = Path(m.group(1).strip())
            result[current] = "not sent"
        elif (m := _RESPONSE.search(line)) and current is not None:
            result[current] = m.group(1)
            current = None
    return result


def syntax_mix(headers: dict[str, pydicom.Dataset]) -> Counter[str]:
    return Counter(str(h.file_meta.TransferSyntaxUID) for h in headers.values())


@dataclass
class RetrievedAll:
    files: dict[str, tuple[str, bytes]]  # SOP Instance UID -> (syntax, dataset bytes)
    log: str  # movescu's output and exit status


def movescu(stored: Stored, level: str, dest: str, *keys: str) -> str:
    """Run movescu (Study Root) against the site; its output, ending with ``exit N``."""
    proc = run_dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        "MOVESCU",
        "-aec",
        stored.serve.aet,
        "-aem",
        dest,
        "-k",
        f"QueryRetrieveLevel={level}",
        *(a for k in keys for a in ("-k", k)),
        "127.0.0.1",
        stored.serve.port,
        check=False,
    )
    return proc.stdout + proc.stderr + f"\nexit {proc.returncode}"
