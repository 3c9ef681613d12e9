"""Federation transfers in the audit trail: two site processes (R=2); a study stored at one is
replicated to the other, whose local audit log records the transfer in (PS3.15 A.5.3.5) with
the member it came from, the study with its SOP classes and counts, and the patient. A wipe and
``recover`` records the transfers of the recovery the same way."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pydicom import dcmread

from p2pacs.audit.log import AuditLog, Cursor
from p2pacs.audit.syslog import parse_frame
from p2pacs.dicom.scu import store_files
from p2pacs.samples import generate_instances
from p2pacs.testbed import Testbed, wait_for

from audit_helpers import Message, objects, parse, role


def audit_messages(site_dir: Path) -> list[Message]:
    log = AuditLog(site_dir / "audit", max_bytes=1 << 30)
    try:
        return [parse(parse_frame(f).message) for _, f in log.read_from(Cursor(1, 0), 100_000)]
    finally:
        log.close()


def fetched_in(site_dir: Path, study: str) -> list[Message]:
    return [
        m for m in audit_messages(site_dir)
        if m.event_id == "110104" and m.action == "C"
        and any(o["ParticipantObjectID"] == study for o in objects(m, "110180/DCM"))
        and role(m, "110152")["UserIsRequestor"] == "true"  # fetched by this site
    ]  # fmt: skip


def test_replication_and_recovery_are_audited(tmp_path: Path) -> None:
    files = generate_instances(tmp_path / "gen", studies=1, series_per_study=2,
                               instances_per_series=3, seed=11)  # fmt: skip
    first = dcmread(files[0], stop_before_pixels=True)
    study, patient = str(first.StudyInstanceUID), str(first.PatientID)
    classes = Counter(str(dcmread(f, stop_before_pixels=True).SOPClassUID) for f in files)
    with Testbed(tmp_path / "fed", ("clinic-a", "clinic-b"), replication=2) as bed:
        bed.start()
        a, b = bed["clinic-a"], bed["clinic-b"]
        report = store_files(a.host, a.dicom_port, a.aet, files)
        assert not report.failed, report.failed
        assert wait_for(lambda: bool(fetched_in(b.path, study)), 60, 0.5), b.log_tail()
        (msg,) = fetched_in(b.path, study)
        assert role(msg, "110153")["UserID"] == "clinic-a"
        assert role(msg, "110152")["UserID"] == b.aet
        (obj,) = objects(msg, "110180/DCM")
        assert sorted(obj["sop_classes"]) == sorted(classes.items())  # type: ignore[arg-type]
        assert [o["ParticipantObjectID"] for o in objects(msg, "2/RFC-3881")] == [patient]

        # the wiped site recovers the study from its member: audited as a transfer in again
        b.stop()
        b.wipe()
        b.start()
        assert wait_for(lambda: len(fetched_in(b.path, study)) >= 2, 90, 0.5), b.log_tail()
    stored_at_a = [m for m in audit_messages(a.path) if m.event_id == "110104"]
    assert len(stored_at_a) == len(files)  # one per C-STORE, the replication not among them
