"""C-ECHO, C-STORE then C-GET/C-MOVE: every instance comes back byte for byte as it was sent.

pydicom's test files cover JPEG baseline/extended/lossless, JPEG 2000, JPEG-LS, RLE, deflated,
big endian and implicit VR; they are sent with ``scu.store_files`` (fixture ``loaded``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import build_role, evt
from pynetdicom.dimse_primitives import C_STORE

from p2pacs.archive import Archive
from p2pacs.dicom.scu import get_study, read_context, store_files
from p2pacs.dicom.uids import (
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
    VERIFICATION,
)

from gw_helpers import (
    AET,
    UNCOMPRESSED,
    Loaded,
    StorageSCP,
    associate,
    contexts_of,
    dataset_bytes,
    decode,
    find,
    header,
    identifier,
    move,
    move_into,
    running_gateway,
    same_elements,
    suboperations,
)

# transfer syntaxes the brief requires among the stored files
REQUIRED_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}


def test_echo(gw_archive: Archive) -> None:
    with running_gateway(gw_archive) as gw:
        assoc = associate(gw, VERIFICATION)
        assert assoc.is_established
        assert [int(assoc.send_c_echo().Status) for _ in range(3)] == [0, 0, 0]
        assoc.release()


def test_store_keeps_every_syntax_as_received(loaded: Loaded) -> None:
    sent = {read_context(p)[1] for p in loaded.files}
    assert set(REQUIRED_SYNTAXES) <= sent, {
        REQUIRED_SYNTAXES[t] for t in set(REQUIRED_SYNTAXES) - sent
    }
    assert loaded.duplicates > 0, "pydicom ships one SOP UID in several syntaxes"
    assert loaded.archive.index.counts()[2] == len(loaded.expected)
    for sop, data in loaded.expected.items():
        rec = loaded.archive.index.instance(sop)
        assert rec is not None, sop
        assert rec.current.transfer_syntax == loaded.expected_ts[sop]
        assert loaded.archive.dataset_bytes(rec) == data, sop


def test_get_every_study_byte_identical(loaded: Loaded) -> None:
    host, port = loaded.gateway.address
    contexts = loaded.contexts()
    for study, sops in sorted(loaded.studies().items()):
        got = get_study(host, port, AET, study, contexts)
        assert set(got) == sops, study
        changed = [s for s in sops if got[s] != loaded.expected[s]]
        assert not changed, changed


def test_move_all_studies_byte_identical_with_counts(loaded: Loaded) -> None:
    studies = sorted(loaded.studies())
    rsps, dest = move_into(
        loaded.gateway,
        STUDY_ROOT_MOVE,
        "DEST",
        contexts_of(loaded.files),
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=studies,
    )
    final = rsps[-1]
    n = len(loaded.expected)
    assert int(final.Status) == 0x0000
    assert suboperations(final) == (n, 0, 0)
    pending = [r for r in rsps if int(r.Status) == 0xFF00]
    assert len(pending) == n  # one pending response per sub-operation
    remaining = [int(r.NumberOfRemainingSuboperations) for r in pending]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 0
    assert set(dest.received) == set(loaded.expected)
    for sop, (ts, data) in dest.received.items():
        assert ts == loaded.expected_ts[sop], sop
        assert data == loaded.expected[sop], sop


def test_patient_root_move_of_one_series(loaded: Loaded) -> None:
    rle = next(s for s, ts in loaded.expected_ts.items() if ts == "1.2.840.10008.1.2.5")
    series = {s for s, uid in loaded.series_of.items() if uid == loaded.series_of[rle]}
    assert loaded.patient_of[rle]
    rsps, dest = move_into(
        loaded.gateway,
        PATIENT_ROOT_MOVE,
        "DEST",
        contexts_of(loaded.files),
        QueryRetrieveLevel="SERIES",
        PatientID=loaded.patient_of[rle],
        StudyInstanceUID=loaded.study_of[rle],
        SeriesInstanceUID=loaded.series_of[rle],
    )
    assert int(rsps[-1].Status) == 0x0000
    assert suboperations(rsps[-1]) == (len(series), 0, 0)
    assert {s: d for s, (_, d) in dest.received.items()} == {s: loaded.expected[s] for s in series}


def test_move_to_unknown_destination_is_a801(loaded: Loaded) -> None:
    study = next(iter(loaded.studies()))
    rsps = move(
        loaded.gateway,
        STUDY_ROOT_MOVE,
        "NOWHERE",
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=study,
    )
    assert [int(r.Status) for r in rsps] == [0xA801]


def _pixels(ts: str, data: bytes) -> Any:
    """pydicom's own decode of an encoded dataset's pixels (None: no pixel data; raises what
    pydicom raises when no installed plugin decodes them)."""
    ds = decode(ts, data)
    if "PixelData" not in ds:
        return None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ds.pixel_array


def _check_uncompressed_only(
    loaded: Loaded,
    sops: set[str],
    final: Dataset,
    received: dict[str, tuple[str, bytes]],
) -> None:
    """Uncompressed little endian instances arrive unchanged, or in the other uncompressed
    syntax with every element value the same. Compressed and big endian ones arrive
    transcoded to an uncompressed syntax with the pixel values pydicom decodes from the stored
    bytes; those pydicom cannot decode here (JPEG Extended 12-bit without the GPL decoder) are
    counted failed sub-operations and nothing of them is sent."""
    decodable = set()
    for sop in sops:
        ts = loaded.expected_ts[sop]
        if ts in UNCOMPRESSED:
            decodable.add(sop)
            continue
        try:
            _pixels(ts, loaded.expected[sop])
        except Exception:
            continue
        decodable.add(sop)
    assert decodable and decodable != sops, "want both outcomes"
    assert int(final.Status) == 0xB000
    assert suboperations(final) == (len(decodable), len(sops) - len(decodable), 0)
    assert set(received) == decodable
    transcoded = 0
    for sop, (ts, data) in received.items():
        assert ts in UNCOMPRESSED
        stored = loaded.expected_ts[sop]
        if ts == stored:
            assert data == loaded.expected[sop], sop
        elif stored in UNCOMPRESSED:
            assert same_elements((stored, loaded.expected[sop]), (ts, data))
        else:
            transcoded += 1
            want, got = _pixels(stored, loaded.expected[sop]), _pixels(ts, data)
            if want is None:
                assert got is None, sop
            else:
                assert np.array_equal(want, got), sop
            assert str(decode(ts, data).SOPInstanceUID) == sop
    assert transcoded > 20


def test_move_to_uncompressed_only_destination_transcodes(loaded: Loaded) -> None:
    plain = {c: list(UNCOMPRESSED) for c in contexts_of(loaded.files)}
    rsps, dest = move_into(
        loaded.gateway,
        STUDY_ROOT_MOVE,
        "PLAIN",
        plain,
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=sorted(loaded.studies()),
    )
    _check_uncompressed_only(loaded, set(loaded.expected), rsps[-1], dest.received)


def test_get_with_uncompressed_only_requester_transcodes(loaded: Loaded) -> None:
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        assert req.DataSet is not None
        ts = str(event.context.transfer_syntax)
        received[str(req.AffectedSOPInstanceUID)] = (ts, bytes(req.DataSet.getvalue()))
        return 0x0000

    studies = sorted(loaded.studies())
    sops = set(loaded.expected)
    classes = sorted({loaded.class_of[s] for s in sops})
    # one context per (class, syntax), so the gateway can send each in its own syntax
    contexts = [(c, [ts]) for c in classes for ts in UNCOMPRESSED]
    assoc = associate(
        loaded.gateway,
        STUDY_ROOT_GET,
        *contexts,
        ext_neg=[build_role(c, scp_role=True) for c in classes],
        handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    try:
        query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=studies)
        rsps = [st for st, _ in assoc.send_c_get(query, STUDY_ROOT_GET)]
    finally:
        assoc.release()
    _check_uncompressed_only(loaded, sops, rsps[-1], received)


def test_duplicate_uid_newest_received_wins(gw_archive: Archive) -> None:
    """Same SOP Instance UID, other bytes: both versions are kept; the newest received is what
    C-GET, C-MOVE and C-FIND see; receiving the older one again makes it current again."""
    little = Path(str(get_testdata_file("MR_small.dcm", download=False)))
    big = Path(str(get_testdata_file("MR_small_bigendian.dcm", download=False)))
    sop_class, _, sop = read_context(little)
    assert read_context(big)[2] == sop and dataset_bytes(little) != dataset_bytes(big)
    study = str(header(little).StudyInstanceUID)
    contexts = [read_context(little)[:2], read_context(big)[:2]]
    syntaxes = [ts for _, ts in contexts]
    with (
        StorageSCP("DEST", {sop_class: syntaxes}) as dest,
        running_gateway(gw_archive, destinations={"DEST": dest.address}) as gw,
    ):
        host, port = gw.address

        def current() -> tuple[bytes, bytes, str]:
            got = get_study(host, port, AET, study, contexts)
            rsps = move(
                gw, STUDY_ROOT_MOVE, "DEST", QueryRetrieveLevel="STUDY", StudyInstanceUID=study
            )
            assert int(rsps[-1].Status) == 0x0000
            found, _ = find(
                gw,
                STUDY_ROOT_FIND,
                QueryRetrieveLevel="IMAGE",
                StudyInstanceUID=study,
                SOPInstanceUID=sop,
                AvailableTransferSyntaxUID="",
            )
            assert len(found) == 1
            return got[sop], dest.received[sop][1], str(found[0].AvailableTransferSyntaxUID)

        for path, versions in ((little, 1), (big, 2), (little, 2)):
            assert not store_files(host, port, AET, [path]).failed
            rec = gw_archive.index.instance(sop)
            assert rec is not None and len(rec.versions) == versions
            want = dataset_bytes(path)
            assert current() == (want, want, read_context(path)[1]), path.name
    assert gw_archive.index.counts()[2] == 1


def test_retrieve_without_unique_key_is_refused(loaded: Loaded) -> None:
    """A retrieve must name what it retrieves; a bad identifier gets 0xA900, nothing is sent."""
    empty = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="")
    rsps, dest = move_into(
        loaded.gateway,
        STUDY_ROOT_MOVE,
        "DEST",
        contexts_of(loaded.files),
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID="",
    )
    assert [int(r.Status) for r in rsps] == [0xA900]
    assert dest.received == {}
    assoc = associate(loaded.gateway, STUDY_ROOT_GET)
    assert assoc.is_established
    try:
        statuses = [int(st.Status) for st, _ in assoc.send_c_get(empty, STUDY_ROOT_GET)]
    finally:
        assoc.release()
    assert statuses == [0xA900]
    bad = Dataset()
    bad.PatientID = "x"  # no QueryRetrieveLevel at all
    assoc = associate(loaded.gateway, STUDY_ROOT_FIND)
    assert assoc.is_established
    try:
        statuses = [int(st.Status) for st, _ in assoc.send_c_find(bad, STUDY_ROOT_FIND)]
    finally:
        assoc.release()
    assert statuses == [0xA900]
