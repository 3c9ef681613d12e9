"""Transcoding on retrieve: which transfer syntax to send an instance in, and re-encoding it.

The archive stores every instance exactly as received (``Archive.submit``); a requester that
did not accept the stored syntax gets a converted copy, and the stored bytes never change.
Pure: bytes and UIDs in, bytes or a ``TranscodeError`` out; the pixel codecs are pydicom's
pixel data handlers (``Dataset.decompress`` / ``Dataset.compress``) over the plugins installed:

- pylibjpeg-openjpeg (MIT; OpenJPEG is BSD-2): JPEG 2000 and HTJ2K decoding, JPEG 2000 encoding;
- pylibjpeg-rle (MIT): RLE Lossless decoding and encoding (pydicom's numpy RLE as fallback);
- pyjpegls (MIT; CharLS is BSD-3): JPEG-LS decoding and encoding;
- python-gdcm (Apache-2.0 bindings; GDCM is BSD): JPEG Baseline, Extended (8-bit) and
  Lossless decoding. pydicom's other JPEG decoder, pylibjpeg-libjpeg, is GPL-3 and is not
  used: p2pacs is Apache-2.0. Without it, JPEG Extended with 12-bit samples has no decoder
  (pydicom refuses GDCM for it): such an instance cannot be converted.

Choosing (``choose_target``): the stored syntax when the requester accepted it; otherwise a
lossless conversion (uncompressed little endian first, then a lossless compressed syntax we can
encode); lossy JPEG 2000, or JPEG Baseline for 8-bit images (encoded with Pillow,
jpegbaseline.py), only when nothing else was accepted and the caller allows it. Every
result is checked with ``validate_dataset`` before it is returned, so a conversion that goes
wrong is an error, never a corrupt dataset.
"""

from __future__ import annotations

import io
import logging
import threading
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.encoders.base import get_encoder
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from p2pacs.dicom import jpegbaseline
from p2pacs.dicom.validate import inflate_dataset, syntax_encoding, validate_dataset
from p2pacs.errors import InvalidDicomError, TranscodeError

__all__ = [
    "LOSSLESS_TARGETS",
    "LOSSY_TARGETS",
    "UNCOMPRESSED",
    "Plan",
    "choose_target",
    "decodable",
    "deliverable_for_all",
    "transcode",
]

log = logging.getLogger(__name__)

# written by pydicom's dataset writer, no pixel codec: preferred in this order
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
# compressed syntaxes encoded without loss (pydicom encoder options; JPEG-LS near-lossless with
# error 0 is lossless, PS3.5 A.4.3)
LOSSLESS_TARGETS: dict[str, dict[str, Any]] = {
    RLELossless: {},
    JPEGLSLossless: {},
    JPEG2000Lossless: {},
    JPEGLSNearLossless: {"jls_error": 0},
}
# lossy only (pydicom's JPEG 2000 encoder insists on a rate): compression ratio 10:1, the
# ratio commonly read as visually lossless for CT/MR; ISO 15444-1 is the method's defined term
LOSSY_J2K_RATIO = 10.0
LOSSY_TARGETS: dict[str, tuple[dict[str, Any], str]] = {
    JPEG2000: ({"j2k_cr": [LOSSY_J2K_RATIO]}, "ISO_15444_1"),
    # 8-bit images only, encoded with Pillow (jpegbaseline.py); ISO 10918-1 is the method
    JPEGBaseline8Bit: ({}, "ISO_10918_1"),
}
# the plugin that decodes (and encodes) each syntax when several are installed: the dedicated
# codec first; GDCM only where nothing else (under a licence we take) decodes. GDCM's own RLE
# encoder aborts the whole process on some images (a C++ exception, e.g. 32-bit RGB), so it
# never encodes here.
_DECODING_PLUGIN: dict[str, str] = {
    **dict.fromkeys(
        (
            "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
            "1.2.840.10008.1.2.4.91",  # JPEG 2000
            "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
            "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
            "1.2.840.10008.1.2.4.203",  # HTJ2K
            RLELossless,
        ),
        "pylibjpeg",
    ),
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
    **dict.fromkeys(
        (
            "1.2.840.10008.1.2.4.50",  # JPEG Baseline
            "1.2.840.10008.1.2.4.51",  # JPEG Extended
            "1.2.840.10008.1.2.4.57",  # JPEG Lossless
            "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        ),
        "gdcm",
    ),
}
_ENCODING_PLUGIN: dict[str, str] = {
    RLELossless: "pylibjpeg",
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
    JPEGLSLossless: "pyjpegls",
    JPEGLSNearLossless: "pyjpegls",
}
# binary VRs whose byte order follows the transfer syntax: value width in bytes
_SWAP_WIDTH = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


_converting = threading.local()  # set while this thread runs ``transcode``


class _QuietWhileConverting(logging.Filter):
    """Drops the tracebacks pydicom's pixel handlers log for every plugin that fails
    (``LOGGER.exception``) while ``transcode`` runs on this thread: the failure is raised as a
    ``TranscodeError`` with pydicom's message, and a peer asking for many instances we cannot
    convert must not fill the log with tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_converting, "active", False)


for _name in ("pydicom.pixels.decoders.base", "pydicom.pixels.encoders.base"):
    logging.getLogger(_name).addFilter(_QuietWhileConverting())


@dataclass(frozen=True, slots=True)
class Plan:
    """How to send one instance: in ``target``; ``lossy`` when that loses information."""

    target: str
    lossy: bool = False

    def as_stored(self, stored: str) -> bool:
        return self.target == stored


def decodable(transfer_syntax: str) -> bool:
    """Whether pixel data in this syntax can be decoded with the handlers installed (a given
    instance may still fail, e.g. JPEG Extended with 12-bit samples)."""
    ts = UID(transfer_syntax)
    if not ts.is_compressed:
        return ts.is_transfer_syntax
    try:
        return bool(get_decoder(ts).is_available)
    except NotImplementedError:  # pydicom has no decoder for it (video, JPEG XL, JPIP...)
        return False


def _encodable(transfer_syntax: str) -> bool:
    if transfer_syntax == JPEGBaseline8Bit:
        return jpegbaseline.available()
    try:
        return bool(get_encoder(transfer_syntax).is_available)
    except NotImplementedError:
        return False


def deliverable_for_all(transfer_syntax: str) -> bool:
    """Whether any decodable instance can be sent in this syntax without loss: the uncompressed
    little endian syntaxes, and the lossless compressed ones we can encode (an encoder may still
    refuse an image it cannot hold, e.g. JPEG-LS over 16 bits)."""
    ts = str(transfer_syntax)
    return ts in UNCOMPRESSED or (ts in LOSSLESS_TARGETS and _encodable(ts))


def choose_target(
    stored: str, accepted: Iterable[str], *, allow_lossy: bool = False
) -> Plan | None:
    """The syntax to send an instance stored in ``stored`` to a requester that accepted
    ``accepted`` (in its order), or None when there is none we can deliver.

    As stored when accepted. Otherwise, if the stored pixel data can be decoded: uncompressed
    little endian (explicit VR first), then the first accepted lossless compressed syntax we
    can encode, then, only with ``allow_lossy`` and nothing else accepted, the first accepted
    lossy syntax (JPEG 2000; JPEG Baseline, which then refuses images other than 8-bit).
    """
    order = list(dict.fromkeys(str(ts) for ts in accepted))
    if stored in order:
        return Plan(stored)
    if not decodable(stored):
        return None
    for plain in UNCOMPRESSED:
        if plain in order:
            return Plan(plain)
    for target in order:
        if target in LOSSLESS_TARGETS and _encodable(target):
            return Plan(target)
    if allow_lossy:
        for target in order:
            if target in LOSSY_TARGETS and _encodable(target):
                return Plan(target, lossy=True)
    return None


def transcode(raw: bytes | memoryview, stored: str, plan: Plan) -> bytes:
    """The dataset ``raw`` (encoded in ``stored``) re-encoded in ``plan.target``.

    Pixel data is decoded with pydicom's handlers (colour as RGB, as pydicom's ``pixel_array``
    gives it) and encoded with the target's encoder; SOP Instance UID and every other attribute
    stay (a lossy plan marks LossyImageCompression and its method and ratio, PS3.3 C.7.6.1.1.5).
    Raises ``TranscodeError`` when the data cannot be decoded or encoded in the target, or is
    not structurally whole; the result is structurally validated before it is returned.
    """
    target = UID(plan.target)
    try:
        syntax_encoding(target)
        validate_dataset(raw, stored)  # pydicom reads past broken structure; we do not
    except InvalidDicomError as exc:
        raise TranscodeError(f"cannot convert: {exc}") from exc
    if (
        target not in UNCOMPRESSED
        and target not in LOSSLESS_TARGETS
        and target not in LOSSY_TARGETS
    ):
        raise TranscodeError(f"cannot encode into {target.name}")
    if target not in UNCOMPRESSED and target not in LOSSLESS_TARGETS and not plan.lossy:
        raise TranscodeError(f"cannot encode into {target.name} without loss")
    _converting.active = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about oddities it reads past
            ds = _read(raw, stored)
            _to_native(ds, UID(stored))
            if target.is_compressed and "PixelData" in ds:
                _compress(ds, plan)
            out = _write(ds, target)
    except TranscodeError:
        raise
    except Exception as exc:  # a codec's or pydicom's failure on this data
        raise TranscodeError(
            f"cannot convert {UID(stored).name} to {target.name}: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        _converting.active = False
    try:
        validate_dataset(out, target)
    except InvalidDicomError as exc:
        raise TranscodeError(f"conversion to {target.name} gave a broken dataset: {exc}") from exc
    return out


def _read(raw: bytes | memoryview, stored: str) -> Dataset:
    implicit, big, deflated, _ = syntax_encoding(stored)
    data = inflate_dataset(raw) if deflated else bytes(raw)
    ds = read_dataset(io.BytesIO(data), implicit, not big)
    for _ in ds.iterall():  # parse every element (nested ones too): pydicom would otherwise
        pass  # write raw ones back in the encoding they were read in, whatever the target
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(stored)
    return ds


def _to_native(ds: Dataset, stored: UID) -> None:
    """Decode encapsulated pixel data; bring big endian binary values to little endian."""
    if stored.is_compressed and "PixelData" in ds:
        plugin = _DECODING_PLUGIN.get(stored, "")
        ds.decompress(generate_instance_uid=False, as_rgb=True, decoding_plugin=plugin)
    elif stored == ExplicitVRBigEndian:
        _swap_binary(ds)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_original_encoding(False, True)
    elif stored.is_compressed:  # no pixel data: the other elements are explicit VR LE already
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _swap_binary(ds: Dataset) -> None:
    """Byte-swap OW/OL/OF/OD/OV values read from big endian (pydicom keeps them as bytes)."""
    bits = int(ds.get("BitsAllocated", 16) or 16)
    for elem in ds.iterall():
        width = _SWAP_WIDTH.get(str(elem.VR))
        if elem.tag == 0x7FE00010 and width and bits > 16:
            width = bits // 8  # pixel data swaps per sample, as pydicom and dcmtk read it
        if width and isinstance(elem.value, bytes | bytearray) and len(elem.value) % width == 0:
            elem.value = (
                np.frombuffer(elem.value, dtype=f">u{width}").astype(f"<u{width}").tobytes()
            )


def _compress(ds: Dataset, plan: Plan) -> None:
    target = plan.target
    if plan.lossy:
        options, method = LOSSY_TARGETS[target]
    else:
        options, method = LOSSLESS_TARGETS[target], ""
    if target == JPEGBaseline8Bit:  # Pillow's encoder, not pydicom's (it has none)
        ratio = jpegbaseline.encode_jpeg_baseline(ds, ds.pixel_array)
        ds.file_meta.TransferSyntaxUID = UID(target)
        _mark_lossy(ds, method, ratio)
        return
    if "PixelData" in ds and ds["PixelData"].VR not in ("OB", "OW"):
        ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) <= 8 else "OW"
    arr = None
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1 and ds.get("PlanarConfiguration") == 1:
        # pydicom's encoders read native colour-by-plane data as colour-by-pixel: hand them
        # the decoded array (colour-by-pixel) instead
        arr = ds.pixel_array
        ds.PlanarConfiguration = 0
    ds.compress(
        target,
        arr,
        encoding_plugin=_ENCODING_PLUGIN.get(target, ""),
        generate_instance_uid=False,
        **options,
    )
    if plan.lossy:
        _mark_lossy(ds, method, LOSSY_J2K_RATIO)


def _mark_lossy(ds: Dataset, method: str, ratio: float) -> None:
    """Lossy Image Compression, its Method and Ratio, appended (PS3.3 C.7.6.1.1.5)."""
    ds.LossyImageCompression = "01"
    methods = _values(ds.get("LossyImageCompressionMethod"))
    ratios = _values(ds.get("LossyImageCompressionRatio"))
    ds.LossyImageCompressionMethod = [*methods, method]
    ds.LossyImageCompressionRatio = [*ratios, f"{ratio:.4g}"]


def _values(elem: Any) -> list[Any]:
    if elem is None or elem == "":
        return []
    return list(elem) if isinstance(elem, Sequence) and not isinstance(elem, str) else [elem]


def _write(ds: Dataset, target: UID) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = target.is_implicit_VR
    ds.set_original_encoding(target.is_implicit_VR, True)
    write_dataset(buf, ds)
    data = buf.getvalue()
    if target == DeflatedExplicitVRLittleEndian:  # PS3.5 A.5: raw deflate, NUL-padded to even
        deflater = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
        if len(data) % 2:
            data += b"\0"
    return bytes(data)
