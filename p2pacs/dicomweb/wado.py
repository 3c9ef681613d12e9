"""WADO-RS and STOW-RS without sockets: Accept headers, multipart framing, metadata, frames,
the STOW-RS response dataset (PS3.18 8.7, 10.4, 10.5)."""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import BYTES_VR

from p2pacs.dicom.transcode import LOSSLESS_TARGETS, UNCOMPRESSED, Plan, transcode
from p2pacs.dicom.validate import inflate_dataset, syntax_encoding
from p2pacs.errors import P2PacsError, TranscodeError

__all__ = [
    "ANY_SYNTAX",
    "DICOM_JSON",
    "MetadataCache",
    "NotAcceptableError",
    "StowResult",
    "accepted_syntaxes",
    "bulk_accept",
    "bulk_uri",
    "frames_of",
    "metadata_json",
    "part_header",
    "stow_response",
    "with_base",
]

ANY_SYNTAX = "*"  # transfer-syntax=* : as stored (PS3.18 8.7.3.5.2)
DICOM_JSON = "application/dicom+json"
INLINE_LIMIT = 4096  # bytes: binary values this long or longer are bulk data in /metadata
# pydicom's threshold is on the base64 length: values of INLINE_LIMIT bytes or more go out as
# BulkDataURI (PS3.18 F.2.6: the server chooses)
_THRESHOLD = (INLINE_LIMIT - 1) // 3 * 4 + 3
# instances whose encoded metadata is kept (a few KB each: ~20-40 MB for a full cache, room
# for several 600-instance series a viewer opens again and again)
METADATA_CACHE_ENTRIES = 8192
_DEFAULT_SYNTAX = str(ExplicitVRLittleEndian)  # PS3.18 Table 8.7.3-2: application/dicom
_SERVED = {*(str(t) for t in UNCOMPRESSED), *LOSSLESS_TARGETS, ANY_SYNTAX}


class NotAcceptableError(P2PacsError):
    """No representation the client accepts can be given (406 with the reason)."""


@dataclass(frozen=True, slots=True)
class _MediaRange:
    media: str
    params: dict[str, str]
    q: float


def _media_ranges(accept: str) -> list[_MediaRange]:
    """The media ranges of an Accept header, best first (PS3.18 8.7.1, RFC 9110 12.5.1)."""
    out = []
    for item in accept.split(","):
        parts = [p.strip() for p in item.split(";")]
        if not parts[0]:
            continue
        params: dict[str, str] = {}
        for p in parts[1:]:
            if "=" in p:
                k, v = p.split("=", 1)
                params[k.strip().lower()] = v.strip().strip('"')
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            out.append(_MediaRange(parts[0].lower(), params, q))
    return sorted(out, key=lambda m: -m.q)  # stable: equal q keep their order


def accepted_syntaxes(accept: str | None, part_type: str) -> list[str]:
    """The transfer syntaxes the client accepts for a multipart/related response of parts
    ``part_type`` (application/dicom, application/octet-stream), in its order of preference;
    ``ANY_SYNTAX`` for "as stored". No Accept, ``*/*`` or no transfer-syntax parameter:
    Explicit VR Little Endian (the default of PS3.18 8.7.3.5). Raises ``NotAcceptableError``
    when nothing acceptable can be served."""
    if not accept:
        return [_DEFAULT_SYNTAX]
    out: list[str] = []
    for rng in _media_ranges(accept):
        if rng.media in ("*/*", "multipart/*"):
            out.append(_DEFAULT_SYNTAX)
        elif rng.media == "multipart/related" and _type_matches(rng, part_type):
            out.append(rng.params.get("transfer-syntax", _DEFAULT_SYNTAX))
    served = [ts for ts in dict.fromkeys(out) if ts in _SERVED]
    if not served:
        raise NotAcceptableError(
            f"none of the accepted representations can be served: {accept!r}; this service "
            f'sends multipart/related; type="{part_type}" with transfer-syntax '
            f"{', '.join(sorted(_SERVED))}"
        )
    return served


def _type_matches(rng: _MediaRange, part_type: str) -> bool:
    """A multipart range's ``type`` allows ``part_type`` (absent, equal, ``*/*`` or ``x/*``)."""
    wanted = rng.params.get("type", part_type).lower()
    return wanted in (part_type, "*/*", part_type.split("/", maxsplit=1)[0] + "/*")


def bulk_accept(accept: str | None) -> tuple[bool, list[str]]:
    """For bulk data and frames: whether the client's first choice is a single
    ``application/octet-stream`` body (PS3.18 8.7.3.3: allowed for one part), and the
    transfer syntaxes accepted, as ``accepted_syntaxes`` gives them."""
    ranges = _media_ranges(accept or "")
    if ranges and ranges[0].media == "application/octet-stream":
        ts = ranges[0].params.get("transfer-syntax", _DEFAULT_SYNTAX)
        if ts not in _SERVED:
            raise NotAcceptableError(f"application/octet-stream in {ts} cannot be served")
        return True, [ts]
    return False, accepted_syntaxes(accept, "application/octet-stream")


def wants_json(accept: str | None) -> bool:
    """Whether a metadata request accepts DICOM JSON (PS3.18 8.7.5)."""
    if not accept:
        return True
    return any(
        r.media in (DICOM_JSON, "application/json", "*/*", "application/*")
        for r in _media_ranges(accept)
    )


def part_header(boundary: str, content_type: str, first: bool) -> bytes:
    """The delimiter and headers before one part of a multipart body (RFC 2046 5.1.1)."""
    lead = b"" if first else b"\r\n"
    return lead + f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")


def closing(boundary: str, empty: bool) -> bytes:
    return (b"" if empty else b"\r\n") + f"--{boundary}--\r\n".encode("ascii")


def _read(
    raw: bytes | memoryview, ts: str, *, pixels: bool, stopped: list[tuple[int, Any]] | None = None
) -> Dataset:
    """The dataset, up to its pixel data unless ``pixels``; ``stopped`` gets the (tag, VR) of
    the pixel data element the read stopped at."""
    implicit, big, deflated, _ = syntax_encoding(ts)
    data = inflate_dataset(raw) if deflated else bytes(raw)

    def at_pixels(tag: Any, vr: Any, length: int) -> bool:
        if int(tag) >= 0x7FE00008:
            if stopped is not None:
                stopped.append((int(tag), vr))
            return True
        return False

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(
            io.BytesIO(data),
            implicit,
            not big,
            stop_when=None if pixels else at_pixels,
        )
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ds


# the pixel data elements (PS3.5 7.6: Float, Double Float and Pixel Data) and their VR when
# an implicit VR dataset does not say
PIXEL_TAGS = {0x7FE00008: "OF", 0x7FE00009: "OD", 0x7FE00010: "OW"}
BULK_URI_KEY = b'"BulkDataURI":"'  # how a BulkDataURI starts in the encoded metadata


def _bulk_paths(ds: Dataset, prefix: tuple[str, ...], out: dict[int, str]) -> None:
    """The relative bulk data URI of every binary element (by ``id``), sequences included."""
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value or (), 1):
                _bulk_paths(item, (*prefix, f"{int(elem.tag):08X}", str(i)), out)
        elif elem.VR in BYTES_VR:
            out[id(elem)] = bulk_uri((*prefix, f"{int(elem.tag):08X}"))


def bulk_uri(steps: Sequence[str]) -> str:
    """An element's bulk data URI relative to its instance's URL: ``bulkdata/`` and the tags
    (eight hex digits) of the sequences, 1-based item numbers and the element itself."""
    return "bulkdata/" + "/".join(steps)


def metadata_json(raw: bytes | memoryview, ts: str) -> dict[str, Any]:
    """An instance's metadata as DICOM JSON (PS3.18 F.2), read from its stored dataset up to
    the pixel data. Binary values of ``INLINE_LIMIT`` bytes or more, and the pixel data, are
    given as a ``BulkDataURI`` relative to the instance's URL (``bulkdata/7FE00010``: the
    service makes it absolute, ``with_base``); smaller ones as InlineBinary."""
    stopped: list[tuple[int, Any]] = []
    ds = _read(raw, ts, pixels=False, stopped=stopped)
    paths: dict[int, str] = {}
    _bulk_paths(ds, (), paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out: dict[str, Any] = ds.to_json_dict(
            bulk_data_threshold=_THRESHOLD, bulk_data_element_handler=lambda e: paths[id(e)]
        )
    if stopped and stopped[0][0] in PIXEL_TAGS:
        tag, vr = stopped[0]
        vr = str(vr) if vr else ("OB" if UID(ts).is_encapsulated else PIXEL_TAGS[tag])
        out[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": bulk_uri((f"{tag:08X}",))}
    return out


def with_base(encoded: bytes, instance_url: str) -> bytes:
    """Encoded metadata with its relative BulkDataURIs made absolute. Safe on the bytes: in
    JSON a string value cannot hold ``"BulkDataURI":"`` unescaped."""
    return encoded.replace(BULK_URI_KEY, BULK_URI_KEY + instance_url.encode() + b"/")


def frames_of(
    raw: bytes | memoryview, ts: str, numbers: Sequence[int], *, as_stored: bool = False
) -> tuple[list[bytes], str]:
    """The requested frames (1-based) and their transfer syntax (PS3.18 8.7.3.5.3): native
    little-endian pixel bytes (Explicit VR Little Endian), decoded with the transcoder's
    handlers when stored compressed; with ``as_stored`` (``transfer-syntax=*``) the stored
    compressed frame itself when the instance is stored encapsulated. Raises
    ``TranscodeError`` or ``IndexError``."""
    if as_stored and UID(ts).is_encapsulated:
        ds = _read(raw, ts, pixels=True)
        if "PixelData" not in ds:
            raise IndexError("the instance has no pixel data")
        count = int(ds.get("NumberOfFrames", 1) or 1)
        stored = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [stored[n - 1] for n in _check_numbers(numbers, len(stored))], ts
    native = raw if ts in UNCOMPRESSED and ts != UNCOMPRESSED[2] else None
    if native is None:
        native = transcode(raw, ts, Plan(ExplicitVRLittleEndian))
        ts = ExplicitVRLittleEndian
    ds = _read(native, ts, pixels=True)
    if "PixelData" not in ds:
        raise IndexError("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    size = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * bits // 8
    if bits == 1:
        raise TranscodeError("frames of 1-bit pixel data are not served")
    data = ds.PixelData
    frames = [bytes(data[(n - 1) * size : n * size]) for n in _check_numbers(numbers, count)]
    return frames, str(ExplicitVRLittleEndian)


def _check_numbers(numbers: Sequence[int], count: int) -> Sequence[int]:
    for n in numbers:
        if not 1 <= n <= count:
            raise IndexError(f"frame {n} out of 1..{count}")
    return numbers


class MetadataCache:
    """Encoded /metadata objects by blob hash, least recently used dropped first. A blob never
    changes under its hash, so an entry is never stale; a new version of an instance is a new
    blob and a new entry. Thread-safe (filled from worker threads)."""

    def __init__(self, capacity: int = METADATA_CACHE_ENTRIES):
        self.capacity = capacity
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class StowResult:
    """The outcome of one STOW-RS part: stored (``failure`` None) or why not."""

    sop_class: str
    sop_instance: str
    failure: int | None = None  # FailureReason (PS3.18 Table 10.5.3-2 / PS3.4 B.2.3)
    retrieve_url: str = ""


def stow_response(results: Iterable[StowResult], study_url: str) -> dict[str, Any]:
    """The STOW-RS response dataset (PS3.18 10.5.3): RetrieveURL of the study, Referenced SOP
    Sequence for stored instances, Failed SOP Sequence with FailureReason for the others."""
    ds = Dataset()
    done, failed = [], []
    for r in results:
        item = Dataset()
        item.ReferencedSOPClassUID = r.sop_class  # empty when the part was unreadable
        item.ReferencedSOPInstanceUID = r.sop_instance
        if r.failure is None:
            item.RetrieveURL = r.retrieve_url
            done.append(item)
        else:
            item.FailureReason = r.failure
            failed.append(item)
    if study_url:
        ds.RetrieveURL = study_url
    if done:
        ds.ReferencedSOPSequence = done
    if failed:
        ds.FailedSOPSequence = failed
    out: dict[str, Any] = ds.to_json_dict()
    return out
