"""Transfer syntax negotiation and transcoding on C-GET/C-MOVE, over real associations.

The defect this guards: a C-GET requester proposing one context per SOP class with
[Explicit VR LE, Implicit VR LE, JPEG Baseline] used to get JPEG Baseline accepted, and then
every instance stored uncompressed failed (0xA702).
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import build_role, evt
from pynetdicom.dimse_primitives import C_STORE

from p2pacs.dicom.uids import STUDY_ROOT_GET

from gw_helpers import (
    UNCOMPRESSED,
    Loaded,
    associate,
    decode,
    identifier,
    running_gateway,
    suboperations,
)


def _pixels(ts: str, data: bytes) -> Any:
    ds = decode(ts, data)
    if "PixelData" not in ds:
        return None
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ds.pixel_array


def _get(
    gw: Any, loaded: Loaded, contexts: list[tuple[str, list[str]]], studies: list[str]
) -> tuple[Dataset, dict[str, tuple[str, bytes]], dict[str, list[str]]]:
    """C-GET ``studies`` proposing ``contexts`` (SCP role for each class): (final status,
    received SOP UID -> (syntax, bytes), accepted syntaxes per class)."""
    received: dict[str, tuple[str, bytes]] = {}

    def on_store(event: evt.Event) -> int:
        req = cast(C_STORE, event.request)
        assert req.DataSet is not None
        received[str(req.AffectedSOPInstanceUID)] = (
            str(event.context.transfer_syntax),
            bytes(req.DataSet.getvalue()),
        )
        return 0x0000

    classes = sorted({c for c, _ in contexts})
    assoc = associate(
        gw,
        STUDY_ROOT_GET,
        *contexts,
        ext_neg=[build_role(c, scp_role=True) for c in classes],
        handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    accepted: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        if str(cx.abstract_syntax) in classes:
            accepted.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    try:
        query = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=studies)
        rsps = [st for st, _ in assoc.send_c_get(query, STUDY_ROOT_GET)]
    finally:
        assoc.release()
    return rsps[-1], received, accepted


def _jpeg_studies(loaded: Loaded) -> tuple[list[str], set[str]]:
    """Studies holding a JPEG Baseline instance, and every instance of them."""
    studies = sorted(
        {loaded.study_of[s] for s, ts in loaded.expected_ts.items() if ts == JPEGBaseline8Bit}
    )
    sops = {s for s, st in loaded.study_of.items() if st in studies}
    return studies, sops


def test_get_proposing_jpeg_baseline_last_gets_everything(loaded: Loaded) -> None:
    """[Explicit VR LE, Implicit VR LE, JPEG Baseline] per class: Explicit VR LE is accepted;
    uncompressed instances go unchanged, JPEG Baseline ones decoded; none fails."""
    studies, sops = _jpeg_studies(loaded)
    classes = sorted({loaded.class_of[s] for s in sops})
    stored = {loaded.expected_ts[s] for s in sops}
    assert JPEGBaseline8Bit in stored and stored & set(UNCOMPRESSED), "want both kinds"
    proposal = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit]
    final, received, accepted = _get(
        loaded.gateway, loaded, [(c, proposal) for c in classes], studies
    )
    assert all(v == [ExplicitVRLittleEndian] for v in accepted.values()), accepted
    assert int(final.Status) == 0x0000, hex(int(final.Status))
    assert suboperations(final) == (len(sops), 0, 0)
    assert set(received) == sops
    for sop, (ts, data) in received.items():
        assert ts == ExplicitVRLittleEndian
        stored_ts = loaded.expected_ts[sop]
        if stored_ts == ExplicitVRLittleEndian:
            assert data == loaded.expected[sop]
        else:
            want = _pixels(stored_ts, loaded.expected[sop])
            got = _pixels(ts, data)
            assert (want is None and got is None) or np.array_equal(want, got), sop


def test_get_with_a_context_per_syntax_sends_jpeg_as_stored(loaded: Loaded) -> None:
    """Two contexts per class, [JPEG Baseline] and [Explicit VR LE]: both are accepted; JPEG
    Baseline instances go byte for byte as stored, the others (decoded if need be) as
    Explicit VR LE."""
    studies, sops = _jpeg_studies(loaded)
    classes = sorted({loaded.class_of[s] for s in sops})
    contexts = [(c, [ts]) for c in classes for ts in (JPEGBaseline8Bit, ExplicitVRLittleEndian)]
    final, received, accepted = _get(loaded.gateway, loaded, contexts, studies)
    assert all(sorted(v) == sorted([JPEGBaseline8Bit, ExplicitVRLittleEndian]) for v in
               accepted.values()), accepted  # fmt: skip
    assert suboperations(final) == (len(sops), 0, 0)
    for sop, (ts, data) in received.items():
        if loaded.expected_ts[sop] == JPEGBaseline8Bit:
            assert (ts, data) == (JPEGBaseline8Bit, loaded.expected[sop]), sop
        else:
            assert ts == ExplicitVRLittleEndian


def _uncompressed_ct(loaded: Loaded) -> tuple[str, str, set[str]]:
    """A study with uncompressed CT Image instances only, one of them at least 32 x 32 pixels
    (the smallest OpenJPEG encodes here): (study, class, its instances)."""
    ct = "1.2.840.10008.5.1.4.1.1.2"
    for study, sops in sorted(loaded.studies().items()):
        classes = {loaded.class_of[s] for s in sops}
        syntaxes = {loaded.expected_ts[s] for s in sops}
        if classes == {ct} and syntaxes <= set(UNCOMPRESSED):
            pixels = [_pixels(loaded.expected_ts[s], loaded.expected[s]) for s in sops]
            if any(px is not None and min(px.shape[:2]) >= 32 for px in pixels):
                return study, ct, sops
    raise AssertionError("no uncompressed CT study among pydicom's files")


def test_lossy_only_requester_fails_unless_configured(loaded: Loaded) -> None:
    """A requester accepting only JPEG 2000 (lossy-capable; pydicom encodes it lossy only):
    by default nothing stored losslessly is sent lossy, each a counted failure; with
    ``lossy_transcoding`` the instances arrive as JPEG 2000 marked lossy, close to the
    original pixels, and the stored bytes are unchanged."""
    study, ct, sops = _uncompressed_ct(loaded)
    final, received, accepted = _get(loaded.gateway, loaded, [(ct, [JPEG2000])], [study])
    assert accepted == {ct: [JPEG2000]}
    assert int(final.Status) == 0xA702
    assert suboperations(final) == (0, len(sops), 0)
    assert not received
    with running_gateway(loaded.archive, lossy_transcoding=True) as lossy_gw:
        final, received, _ = _get(lossy_gw, loaded, [(ct, [JPEG2000])], [study])
    # OpenJPEG, as pylibjpeg-openjpeg drives it, uses 6 wavelet resolutions: images under
    # 32 x 32 pixels cannot be encoded, and count as failed sub-operations
    small = set()
    for sop in sops:
        px = _pixels(loaded.expected_ts[sop], loaded.expected[sop])
        if px is not None and min(px.shape[:2]) < 32:
            small.add(sop)
    assert len(small) < len(sops)
    assert suboperations(final) == (len(sops) - len(small), len(small), 0)
    assert set(received) == sops - small
    lossy = 0
    for sop, (ts, data) in received.items():
        assert ts == JPEG2000
        ds = decode(ts, data)
        original = _pixels(loaded.expected_ts[sop], loaded.expected[sop])
        if original is None:  # no pixel data: nothing to compress, nothing lost
            assert "PixelData" not in ds and "LossyImageCompression" not in ds
            continue
        lossy += 1
        assert ds.LossyImageCompression == "01"
        want = original.astype(float)
        got = _pixels(ts, data).astype(float)
        assert got.shape == want.shape
        assert np.abs(got - want).mean() < 0.02 * float(np.ptp(want))
    assert lossy
    for sop in sops:  # the archive still holds the original bytes
        rec = loaded.archive.index.instance(sop)
        assert rec is not None
        assert bytes(loaded.archive.blob(rec.current.hash)) == loaded.expected[sop]
