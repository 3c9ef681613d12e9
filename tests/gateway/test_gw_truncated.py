"""Structurally broken datasets over real associations: refused with 0xC210, nothing stored, and
the association goes on to store a good instance.

The datasets are the ones of the bug report, which dcmtk's storescp refuses and p2pacs used to
acknowledge: CT_small cut inside its Pixel Data at 20%, 50% and 90%; the whole dataset followed
by an element whose length runs far past the end; the whole dataset followed by an undefined
length sequence that is never closed; the 50% cut read and written back by pydicom (Pixel Data
then shorter than Rows x Columns x 16 bits). pynetdicom sends each file's dataset bytes as they
are (``STORE_SEND_CHUNKED_DATASET``), never decoding and re-encoding them.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from p2pacs.archive import Archive
from p2pacs.dicom import split_part10

from gw_helpers import associate, running_gateway

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
MALFORMED = 0xC210  # PS3.4 C.4.2.1.4 (Cannot understand); p2pacs's status.MALFORMED_DATASET


def _broken_files(out: Path) -> dict[str, Path]:
    """The bug report's datasets, each behind CT_small's own file meta."""
    raw = Path(str(get_testdata_file("CT_small.dcm", download=False))).read_bytes()
    part = split_part10(raw)
    data = bytes(part.dataset)
    never_closed = struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"SQ", 0, 0xFFFFFFFF)
    never_closed += struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    never_closed += struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 4) + b"1234"
    datasets = {
        "cut-20": data[: len(data) * 20 // 100],
        "cut-50": data[: len(data) // 2],
        "cut-90": data[: len(data) * 90 // 100],
        "runs-past": data + struct.pack("<HH2sHI", 0x7FE1, 0x0010, b"OB", 0, 1 << 30) + b"\0" * 8,
        "never-closed": data + never_closed,
    }
    files = {}
    for name, body in datasets.items():
        files[name] = out / f"{name}.dcm"
        files[name].write_bytes(part.prefix + body)
    ds = pydicom.dcmread(io.BytesIO(raw[: len(part.prefix) + len(data) // 2]))
    assert len(ds.PixelData) < 128 * 128 * 2
    files["cut-50-re-encoded"] = out / "cut-50-re-encoded.dcm"
    ds.save_as(files["cut-50-re-encoded"], enforce_file_format=True)
    return files


def test_broken_datasets_are_refused_and_the_association_goes_on(
    gw_archive: Archive, tmp_path: Path, raw_sends: None
) -> None:
    broken = _broken_files(tmp_path)
    good = Path(str(get_testdata_file("CT_small.dcm", download=False)))
    with running_gateway(gw_archive) as gw:
        assoc = associate(gw, (CT, [EXPLICIT]))
        assert assoc.is_established
        try:
            for name, path in broken.items():
                rsp = assoc.send_c_store(path)
                assert int(rsp.Status) == MALFORMED, name
                assert assoc.is_established, name
                assert gw_archive.index.counts() == (0, 0, 0), name
                assert gw_archive.blobs.totals() == (0, 0), name
            rsp = assoc.send_c_store(good)
            assert int(rsp.Status) == 0x0000
        finally:
            assoc.release()
    assert gw_archive.index.counts() == (1, 1, 1)
    record = gw_archive.index.instance(str(pydicom.dcmread(good).SOPInstanceUID))
    assert record is not None
    assert gw_archive.dataset_bytes(record) == bytes(split_part10(good.read_bytes()).dataset)
