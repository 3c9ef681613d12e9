"""Helpers for the multi-process fault tests: send, wait for replication, check nothing is lost."""

from __future__ import annotations

import shutil
from pathlib import Path

from p2pacs.dicom.header import extract_attributes
from p2pacs.dicom.part10 import split_part10
from p2pacs.dicom.scu import get_study, store_files
from p2pacs.testbed import SiteProcess, wait_for

SITES = ("research-lab", "clinic-a", "clinic-b")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # pynetdicom puts same-named apps in the venv


def dcmtk(tool: str) -> str | None:
    """Path of Debian's dcmtk tool (not pynetdicom's same-named app), or None."""
    return shutil.which(tool, path=SYSTEM_PATH)


def ingest(site: SiteProcess, files: list[Path]) -> list[Path]:
    report = store_files(site.host, site.dicom_port, site.aet, files)
    assert not report.failed, report.failed
    return report.stored


def wait_replicated(site: SiteProcess, studies: set[str], copies: int, timeout: float = 60) -> None:
    assert wait_for(lambda: site.holds_whole(studies, copies), timeout, 0.5), (
        f"studies did not reach {copies} live copies"
    )


def ingest_replicated(site: SiteProcess, files: list[Path]) -> tuple[list[Path], set[str]]:
    """C-STORE ``files`` at ``site`` and wait until every study is whole at two live sites."""
    stored = ingest(site, files)
    studies = studies_of(stored)
    wait_replicated(site, studies, 2)
    return stored, studies


def originals(files: list[Path]) -> dict[str, tuple[str, str, bytes]]:
    """SOP Instance UID -> (SOP class, transfer syntax, dataset bytes) of what was sent."""
    out = {}
    for path in files:
        part = split_part10(path.read_bytes())
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        out[str(attrs["SOPInstanceUID"])] = (
            str(attrs["SOPClassUID"]),
            part.transfer_syntax,
            bytes(part.dataset),
        )
    return out


def lost_at(
    site: SiteProcess, study_uids: set[str], sent: dict[str, tuple[str, str, bytes]]
) -> list[str]:
    """Instances of ``sent`` that a C-GET from ``site`` does not return byte for byte."""
    contexts = sorted({(c, t) for c, t, _ in sent.values()})
    got: dict[str, bytes] = {}
    for uid in study_uids:
        got.update(get_study(site.host, site.dicom_port, site.aet, uid, contexts))
    return sorted(sop for sop, (_, _, data) in sent.items() if got.get(sop) != data)


def scrub_clean(site: SiteProcess) -> None:
    """Re-hash every blob at a running site: nothing corrupt."""
    done = site.run_cli("scrub", timeout=120)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def studies_of(files: list[Path]) -> set[str]:
    out = set()
    for path in files:
        part = split_part10(path.read_bytes())
        out.add(str(extract_attributes(part.dataset, part.transfer_syntax)["StudyInstanceUID"]))
    return out
