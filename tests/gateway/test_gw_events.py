"""The gateway tells the site's event bus about every request and association (what metrics and
the audit trail are built on), over real associations, with the status really answered."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from p2pacs.archive import Archive
from p2pacs.dicom.scu import store_files
from p2pacs.dicom.uids import STUDY_ROOT_FIND, STUDY_ROOT_MOVE
from p2pacs.events import AssociationEvent, DicomRequest, Event, EventBus

from gw_helpers import AET, find, move, move_into, running_gateway


class Recorder:
    def __init__(self, bus: EventBus):
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        bus.subscribe(self._on)

    def _on(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def _requests(self, service: str) -> list[DicomRequest]:
        return [e for e in self.events if isinstance(e, DicomRequest) and e.service == service]

    def wait_for(self, service: str, count: int, timeout: float = 10.0) -> list[DicomRequest]:
        """The first ``count`` requests of ``service``, once emitted (events come from the
        gateway's threads, after the answer has gone out)."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._requests(service)) >= count, timeout)
            found = self._requests(service)
        assert len(found) >= count, f"{service}: {len(found)} events, expected {count}"
        return found


def test_store_find_move_each_emit_one_request(gw_archive: Archive) -> None:
    rec = Recorder(gw_archive.events)
    path = Path(str(get_testdata_file("CT_small.dcm")))
    ds = dcmread(path)
    with running_gateway(gw_archive) as gw:
        report = store_files(*gw.address, AET, [path], calling_aet="MODALITY1")
        assert len(report.stored) == 1
        (stored,) = rec.wait_for("C-STORE", 1)
        assert stored.status == 0
        assert stored.calling_ae == "MODALITY1"
        assert stored.sop_uids == (ds.SOPInstanceUID,)
        assert stored.study_uids == (ds.StudyInstanceUID,)
        assert stored.patient_ids == (ds.PatientID,)
        assert stored.bytes > 0 and stored.completed == 1

        results, final = find(
            gw, STUDY_ROOT_FIND, QueryRetrieveLevel="STUDY", PatientID=ds.PatientID,
            StudyInstanceUID="",
        )  # fmt: skip
        assert final == 0 and len(results) == 1
        (found,) = rec.wait_for("C-FIND", 1)
        assert found.status == 0 and found.completed == 1
        assert found.level == "STUDY" and found.patient_ids == (ds.PatientID,)

        statuses = move(
            gw, STUDY_ROOT_MOVE, "NOWHERE", QueryRetrieveLevel="STUDY",
            StudyInstanceUID=ds.StudyInstanceUID,
        )  # fmt: skip
        assert statuses[-1].Status == 0xA801
        (refused,) = rec.wait_for("C-MOVE", 1)
        assert refused.status == 0xA801 and refused.destination == "NOWHERE"

        contexts = {ds.SOPClassUID: {str(ds.file_meta.TransferSyntaxUID)}}
        statuses, dest = move_into(
            gw, STUDY_ROOT_MOVE, "DEST", contexts, QueryRetrieveLevel="STUDY",
            StudyInstanceUID=ds.StudyInstanceUID,
        )  # fmt: skip
        assert statuses[-1].Status == 0 and list(dest.received) == [ds.SOPInstanceUID]
        moved = rec.wait_for("C-MOVE", 2)[1]
        assert moved.status == 0 and moved.completed == 1 and moved.failed == 0
        assert moved.study_uids == (ds.StudyInstanceUID,)

    opened = [e for e in rec.events if isinstance(e, AssociationEvent) and e.opened]
    ended = [e for e in rec.events if isinstance(e, AssociationEvent) and not e.opened]
    assert len(opened) == 4 and len(ended) == 4
    assert {e.calling_ae for e in opened} >= {"MODALITY1", "TESTSCU"}


def test_refused_store_is_emitted_with_its_status(gw_archive: Archive, tmp_path: Path) -> None:
    rec = Recorder(gw_archive.events)
    data = Path(str(get_testdata_file("CT_small.dcm"))).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 1000])  # pixel data cut short: structurally broken
    with running_gateway(gw_archive) as gw:
        store_files(*gw.address, AET, [cut])
        (refused,) = rec.wait_for("C-STORE", 1)
    assert refused.status == 0xC210
    assert refused.completed == 0 and refused.sop_uids == ()


def test_a_failing_observer_never_fails_the_request(gw_archive: Archive) -> None:
    def broken(_event: Event) -> None:
        raise RuntimeError("observer bug")

    gw_archive.events.subscribe(broken)
    rec = Recorder(gw_archive.events)
    path = Path(str(get_testdata_file("CT_small.dcm")))
    with running_gateway(gw_archive) as gw:
        report = store_files(*gw.address, AET, [path])
        assert len(report.stored) == 1
        rec.wait_for("C-STORE", 1)


@pytest.mark.parametrize("count", [0, 1])
def test_unsubscribe(count: int) -> None:
    bus = EventBus()
    seen: list[Event] = []
    off = bus.subscribe(seen.append)
    if count == 0:
        off()
    bus.emit(AssociationEvent(True, "A", "127.0.0.1"))
    assert len(seen) == count
