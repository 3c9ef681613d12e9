"""The federation demo: three sites, one crash, one wipe, nothing lost.

A research lab and two clinical sites on loopback. The sample studies arrive at clinic A over
DICOM C-STORE; the federation replicates them to R=2 sites; clinic A is killed with SIGKILL, its
archive wiped, and it is restarted and recovered from the others; finally every instance is
retrieved from clinic A with C-GET and compared byte for byte with what was sent.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2pacs.dicom.header import extract_attributes
from p2pacs.dicom.part10 import split_part10
from p2pacs.dicom.scu import get_study, store_files
from p2pacs.errors import RecoveryError, ReplicationError
from p2pacs.testbed import Testbed, wait_for

__all__ = ["SITES", "DemoResult", "run_demo"]

log = logging.getLogger(__name__)

SITES = ("research-lab", "clinic-a", "clinic-b")
REPLICATION = 2
REPLICATION_TIMEOUT = 180.0  # seconds for every study to reach R sites
RECOVERY_TIMEOUT = 300.0


@dataclass(slots=True)
class DemoResult:
    studies: int = 0
    instances: int = 0
    bytes: int = 0
    rejected: int = 0  # sample files the gateway refused (not archivable), never counted as sent
    replication_s: float = 0.0
    recovery_s: float = 0.0
    verified: int = 0
    lost: list[str] = field(default_factory=list)
    steps: list[tuple[str, float]] = field(default_factory=list)


def _originals(files: Sequence[Path]) -> dict[str, tuple[str, str, str, bytes]]:
    """SOP Instance UID -> (study, SOP class, transfer syntax, dataset bytes), newest file wins."""
    out = {}
    for path in files:
        data = path.read_bytes()
        part = split_part10(data)
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        sop = str(attrs["SOPInstanceUID"])  # the dataset's, which C-GET reports (not the meta's)
        out[sop] = (
            str(attrs["StudyInstanceUID"]), str(attrs["SOPClassUID"]), part.transfer_syntax,
            bytes(part.dataset),
        )  # fmt: skip
    return out


def run_demo(
    root: Path, files: Sequence[Path], say: Callable[[str], None] = log.info
) -> DemoResult:
    result = DemoResult()
    t0 = time.monotonic()

    def step(text: str) -> None:
        result.steps.append((text, time.monotonic() - t0))
        say(text)

    with Testbed(root, SITES, replication=REPLICATION) as bed:
        step(f"federation of {len(SITES)} sites created in {root}")
        bed.start()
        step("sites started: " + ", ".join(SITES))
        clinic = bed["clinic-a"]
        sent = store_files(clinic.host, clinic.dicom_port, clinic.aet, files)
        result.rejected = len(sent.failed)
        originals = _originals(sent.stored)
        studies = sorted({v[0] for v in originals.values()})
        result.studies, result.instances = len(studies), len(originals)
        result.bytes = sum(len(v[3]) for v in originals.values())
        step(
            f"C-STORE to clinic-a: {len(sent.stored)} files accepted "
            f"({result.instances} instances, {result.studies} studies), "
            f"{len(sent.failed)} refused as not archivable"
        )
        start = time.monotonic()

        expected = Counter(v[0] for v in originals.values())

        if not wait_for(
            lambda: clinic.holds_whole(set(studies), REPLICATION, expected),
            REPLICATION_TIMEOUT,
            0.5,
        ):
            raise ReplicationError(
                f"studies did not reach {REPLICATION} sites in {REPLICATION_TIMEOUT:.0f} s; "
                f"see the logs in {root}"
            )
        result.replication_s = time.monotonic() - start
        step(f"every study held by {REPLICATION} sites after {result.replication_s:.1f} s")

        clinic.kill()
        clinic.wipe()
        step("clinic-a killed with SIGKILL and its archive wiped (identity kept)")
        start = time.monotonic()
        clinic.start()
        done = clinic.run_cli("recover", timeout=RECOVERY_TIMEOUT)
        result.recovery_s = time.monotonic() - start
        if done.returncode != 0:
            log.error("recover: %s", done.stderr.decode(errors="replace")[-2000:])
            raise RecoveryError(f"recover exited with {done.returncode}; see {clinic.log_path}")
        step(f"clinic-a restarted and recovered in {result.recovery_s:.1f} s")

        contexts = sorted({(v[1], v[2]) for v in originals.values()})
        got: dict[str, bytes] = {}
        for uid in studies:
            got.update(get_study(clinic.host, clinic.dicom_port, clinic.aet, uid, contexts))
        for sop, (_, _, _, dataset) in originals.items():
            if got.get(sop) == dataset:
                result.verified += 1
            else:
                result.lost.append(sop)
        step(
            f"C-GET from clinic-a: {result.verified} of {result.instances} instances "
            "byte-identical to what was sent"
        )
    return result
