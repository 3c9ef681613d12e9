"""Bulk data without sockets (p2pacs/dicomweb/bulkdata.py, wado.metadata_json): BulkDataURIs
in the metadata of pydicom's test files, and the values behind them byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from p2pacs.archive import Archive
from p2pacs.dicom import split_part10
from p2pacs.dicomweb.bulkdata import BulkDataNotFoundError, bulk_value, parse_path
from p2pacs.dicomweb.metastore import DB_NAME, MetadataStore
from p2pacs.dicomweb.wado import (
    INLINE_LIMIT,
    NotAcceptableError,
    accepted_syntaxes,
    bulk_accept,
    metadata_json,
    with_base,
)
from p2pacs.errors import TranscodeError

EXPLICIT = "1.2.840.10008.1.2.1"


def _part(files: list[Path], name: str) -> tuple[bytes, str, pydicom.Dataset]:
    path = next(p for p in files if p.name == name)
    part = split_part10(path.read_bytes())
    return bytes(part.dataset), part.transfer_syntax, pydicom.dcmread(path)


def _uris(meta: object) -> list[str]:
    text = json.dumps(meta)
    return [x.split('"')[0] for x in text.split('"BulkDataURI": "')[1:]]


def test_parse_path() -> None:
    assert parse_path("7FE00010") == ((), 0x7FE00010)
    assert parse_path("54000100/2/54001010") == (((0x54000100, 2),), 0x54001010)
    assert parse_path("00880200/1/7fe00010/") == (((0x00880200, 1),), 0x7FE00010)
    for bad, why in [
        ("7FE0001", "eight hex"),
        ("54000100/2", "ending with a tag"),
        ("54000100/0/54001010", "not an item number"),
        ("54000100/x/54001010", "not an item number"),
        ("GGGGGGGG", "eight hex"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_path(bad)


def test_metadata_gives_bulk_data_uris_for_large_binary_values(
    pydicom_all_files: list[Path],
) -> None:
    raw, ts, ds = _part(pydicom_all_files, "examples_overlay.dcm")
    meta = metadata_json(raw, ts)
    assert _uris(meta) == [
        "bulkdata/00291110",  # a private OB value of 5342 bytes
        "bulkdata/00880200/1/7FE00010",  # the icon image's pixels, inside a sequence
        "bulkdata/60003000",  # the overlay
        "bulkdata/7FE00010",  # the pixel data: never read for metadata
    ]
    assert meta["60003000"] == {"vr": "OW", "BulkDataURI": "bulkdata/60003000"}
    small = [k for k, v in meta.items() if "InlineBinary" in v]
    assert all(len(ds[int(k, 16)].value) < INLINE_LIMIT for k in small)
    raw, ts, _ = _part(pydicom_all_files, "waveform_ecg.dcm")
    assert _uris(metadata_json(raw, ts)) == [
        "bulkdata/54000100/1/54001010",
        "bulkdata/54000100/2/54001010",
    ]
    encoded = json.dumps(metadata_json(raw, ts), separators=(",", ":")).encode()
    absolute = json.loads(with_base(encoded, "https://h/dicomweb/studies/1/series/2/instances/3"))
    assert absolute["54000100"]["Value"][1]["54001010"]["BulkDataURI"] == (
        "https://h/dicomweb/studies/1/series/2/instances/3/bulkdata/54000100/2/54001010"
    )


def test_bulk_values_are_the_stored_values(pydicom_all_files: list[Path]) -> None:
    raw, ts, ds = _part(pydicom_all_files, "examples_overlay.dcm")
    for path, want in [
        ("00291110", ds[0x00291110].value),
        ("60003000", ds[0x60003000].value),
        ("00880200/1/7FE00010", ds[0x00880200][0].PixelData),
        ("7FE00010", ds.PixelData),
    ]:
        assert bulk_value(raw, ts, parse_path(path)) == ([bytes(want)], EXPLICIT), path
    raw, ts, ds = _part(pydicom_all_files, "waveform_ecg.dcm")
    got = bulk_value(raw, ts, parse_path("54000100/2/54001010"))
    assert got == ([bytes(ds.WaveformSequence[1].WaveformData)], EXPLICIT)
    for missing, why in [
        ("54000100/3/54001010", "no .5400,0100. item 3"),
        ("60003000", r"no \(6000,3000\)"),
        ("00100010", "is PN, not bulk data"),
    ]:
        with pytest.raises(BulkDataNotFoundError, match=why):
            bulk_value(raw, ts, parse_path(missing))


def test_pixel_data_native_decoded_or_as_stored(pydicom_all_files: list[Path]) -> None:
    raw, ts, ds = _part(pydicom_all_files, "MR_small_bigendian.dcm")
    (value,), syntax = bulk_value(raw, ts, parse_path("7FE00010"))
    assert syntax == EXPLICIT  # big endian stored: sent little endian
    want = ds.pixel_array
    assert np.array_equal(np.frombuffer(value, dtype="<i2").reshape(want.shape), want)
    raw, ts, ds = _part(pydicom_all_files, "SC_rgb_rle_2frame.dcm")
    (value,), syntax = bulk_value(raw, ts, parse_path("7FE00010"))
    assert syntax == EXPLICIT and value == ds.pixel_array.tobytes()  # decoded, both frames
    stored, syntax = bulk_value(raw, ts, parse_path("7FE00010"), as_stored=True)
    assert syntax == ts and stored == list(generate_frames(ds.PixelData, number_of_frames=2))
    raw, ts, _ = _part(pydicom_all_files, "JPEG-lossy.dcm")  # 12-bit JPEG Extended: no decoder
    with pytest.raises(TranscodeError):
        bulk_value(raw, ts, parse_path("7FE00010"))


def test_accept_for_bulk_data() -> None:
    octet = 'multipart/related; type="application/octet-stream"'
    assert bulk_accept(None) == (False, [EXPLICIT])
    assert bulk_accept(f"{octet}; transfer-syntax=*") == (False, ["*"])
    assert bulk_accept('multipart/related; type="*/*"') == (False, [EXPLICIT])  # dicomweb-client
    assert bulk_accept("application/octet-stream") == (True, [EXPLICIT])
    assert bulk_accept("application/octet-stream; transfer-syntax=*") == (True, ["*"])
    with pytest.raises(NotAcceptableError):
        bulk_accept("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.50")
    with pytest.raises(NotAcceptableError):
        bulk_accept("image/png")
    assert accepted_syntaxes('multipart/related; type="application/*"', "application/dicom") == [
        EXPLICIT
    ]


def test_metadata_kept_in_an_older_format_is_built_again(
    tmp_path: Path, pydicom_all_files: list[Path]
) -> None:
    path = next(p for p in pydicom_all_files if p.name == "examples_overlay.dcm")
    archive = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    try:
        rec = archive.index.instance(archive.import_file(path).sop_uid)
        assert rec is not None
        h = rec.current.hash
        old = b'{"00080018":{"vr":"UI","Value":["1.2"]}}'  # no format byte: before bulk data
        db = archive.db.db(DB_NAME)
        archive.db.submit(lambda txn: txn.put(bytes.fromhex(h), old, db=db)).result(10)
        store = MetadataStore(archive)
        assert store.stored([h]) == {}
        (entry,) = store.get_many([(h, rec.current.transfer_syntax)])
        assert store.built == 1 and b"bulkdata/60003000" in entry
        store.keep({h: entry}).result(10)
        assert MetadataStore(archive).stored([h]) == {h: entry}
    finally:
        archive.close()
