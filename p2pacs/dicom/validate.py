"""Structural validation of an encoded dataset: every length, item and delimiter, to the last byte.

``validate_dataset`` walks the element structure of a dataset in its transfer syntax (PS3.5
section 7) without decoding any value: each element's header is read with a precompiled
``struct`` and its value skipped by length, so the pixel data is never copied or looked at.
It refuses (``MalformedDatasetError``, naming the byte offset, the tag and what was expected):

- an element whose header or value runs past the end of its dataset, item or sequence;
- an odd value length (PS3.5 7.1.1: every value has an even length), an undefined length on an
  element that cannot have one, an unknown VR (explicit VR);
- a sequence or item of undefined length not closed by its delimiter at the right nesting
  (PS3.5 7.5), a defined-length sequence or item whose contents do not end exactly at its end,
  a delimiter or item where an element belongs and the other way round;
- encapsulated Pixel Data (PS3.5 A.4) that is not a Basic Offset Table item, then fragment
  items of defined even length, then the sequence delimiter;
- native Pixel Data shorter than Rows x Columns x Samples per Pixel x Bits Allocated x Number
  of Frames (read from the top-level dataset as the walk passes them);
- a deflated dataset (PS3.5 A.5) that does not inflate completely, or has bytes after the
  deflate stream other than one NUL pad to even length or a gzip-style trailer that matches.

Undefined-length UN (and OB/OW other than Pixel Data) is walked as a sequence in implicit VR
little endian (PS3.5 6.2.2); in implicit VR, a defined-length element is walked as a sequence
when the data dictionary says its VR is SQ. Pure: bytes in, ``None`` or an exception out.
"""

from __future__ import annotations

import struct
import zlib
from contextlib import suppress

from pydicom._dicom_dict import DicomDictionary
from pydicom.uid import UID, ExplicitVRLittleEndian

from p2pacs.errors import InvalidDicomError, MalformedDatasetError

__all__ = ["inflate_dataset", "plain_dataset", "syntax_encoding", "validate_dataset"]

# ``_walk`` writes these as literals (a constant loads faster than a global): 0xFFFFFFFF undefined
# length (PS3.5 7.1.1); group 0xFFFE with 0xE000 Item, 0xE00D Item Delimitation Item, 0xE0DD
# Sequence Delimitation Item (PS3.5 7.5); (7FE0,0010) Pixel Data; modes 0, 1, 2 below.

# Explicit VR: VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2, table 7.1-1)
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
        b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip
# undefined length on these (other than Pixel Data) is a sequence in implicit VR LE (6.2.2)
_IMPLICIT_SQ_VRS = frozenset({b"UN", b"OB", b"OW"})
# tags whose dictionary VR is SQ: how an implicit VR walk knows a defined-length sequence
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")

# top-level attributes that size native Pixel Data (group 0028)
_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS = 0x2, 0x4, 0x8, 0x10, 0x11, 0x100
_PIXEL_DATA, _FLOAT_PIXELS, _DOUBLE_PIXELS = 0x0010, 0x0008, 0x0009  # group 7FE0
# native YBR_FULL_422 stores two samples per pixel, not three (PS3.3 C.7.6.3.1.2)
_SUBSAMPLED = (b"YBR_FULL_422", b"YBR_PARTIAL_422")

# walk modes: in a dataset or item (elements), a sequence (items), encapsulated Pixel Data
_DATASET, _SEQUENCE, _FRAGMENTS = 0, 1, 2
# explicit VR kinds, looked up once per element
_SHORT, _LONG, _SQ, _LONG_OR_SQ = 0, 1, 2, 3
_VR_KIND = {vr: _SHORT for vr in _SHORT_VRS} | {vr: _LONG for vr in _LONG_VRS}
_VR_KIND |= {b"SQ": _SQ} | {vr: _LONG_OR_SQ for vr in _IMPLICIT_SQ_VRS}

# (tag, VR, 16-bit length) / (tag, 32-bit length) / 32 / 16-bit values, each byte order
_EXPLICIT = {False: struct.Struct("<HH2sH"), True: struct.Struct(">HH2sH")}
_TAG_LEN = {False: struct.Struct("<HHI"), True: struct.Struct(">HHI")}
_U32 = {False: struct.Struct("<I"), True: struct.Struct(">I")}
_U16 = {False: struct.Struct("<H"), True: struct.Struct(">H")}

_GZIP_TRAILER = struct.Struct("<II")  # RFC 1952 section 2.3.1: CRC-32 and size of the input

_SYNTAX_CACHE: dict[str, tuple[bool, bool, bool, bool]] = {}


def _tag(group: int, elem: int) -> str:
    return f"({group:04X},{elem:04X})"


def syntax_encoding(transfer_syntax: str) -> tuple[bool, bool, bool, bool]:
    """(implicit VR, big endian, deflated, encapsulated) of a transfer syntax UID.

    Raises ``InvalidDicomError`` for a UID that is not a known transfer syntax."""
    enc = _SYNTAX_CACHE.get(transfer_syntax)
    if enc is None:
        uid = UID(transfer_syntax)
        try:
            if not uid.is_transfer_syntax:
                raise ValueError(transfer_syntax)
            enc = (
                uid.is_implicit_VR,
                not uid.is_little_endian,
                uid.is_deflated,
                uid.is_encapsulated,
            )
        except ValueError as exc:
            raise InvalidDicomError(
                f"{transfer_syntax!r} is not a known transfer syntax UID"
            ) from exc
        if len(_SYNTAX_CACHE) < 256:  # a peer can't grow it without bound
            _SYNTAX_CACHE[transfer_syntax] = enc
    return enc


def inflate_dataset(dataset: bytes | memoryview) -> bytes:
    """The dataset of a deflated transfer syntax, inflated (PS3.5 A.5).

    The deflate stream must be complete and end the data, but for one NUL byte that pads it to
    an even length, and a gzip-style trailer (CRC-32 and size of the inflated bytes) that
    matches them (David Clunie's dctool writes one; dcmtk reads it)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(dataset)
    except zlib.error as exc:
        raise MalformedDatasetError(f"deflated dataset does not inflate: {exc}") from exc
    if not inflater.eof:
        raise MalformedDatasetError(
            f"deflated dataset is cut short: its deflate stream does not end within its "
            f"{len(dataset)} bytes"
        )
    extra = inflater.unused_data
    if extra and extra[:8] == _GZIP_TRAILER.pack(zlib.crc32(data), len(data) & 0xFFFFFFFF):
        extra = extra[8:]  # a gzip-style trailer (CRC-32, size) some writers add: it checks out
    if extra and not (extra == b"\x00" and len(dataset) % 2 == 0):
        raise MalformedDatasetError(
            f"deflated dataset has {len(extra)} byte(s) after the end of its deflate stream "
            f"(at byte {len(dataset) - len(extra)})"
        )
    return data


def plain_dataset(
    dataset: bytes | memoryview, transfer_syntax: str
) -> tuple[bytes | memoryview, str]:
    """The dataset as its elements are encoded: a deflated one inflated (it is then explicit VR
    little endian), any other as it is. Lets a caller inflate once for every reader."""
    if syntax_encoding(transfer_syntax)[2]:
        return inflate_dataset(dataset), ExplicitVRLittleEndian
    return dataset, transfer_syntax


def validate_dataset(dataset: bytes | memoryview, transfer_syntax: str) -> None:
    """Check that ``dataset`` (encoded in ``transfer_syntax``) is structurally whole.

    Raises ``MalformedDatasetError`` saying where the structure broke, ``InvalidDicomError``
    for an unknown transfer syntax."""
    implicit, big, deflated, encapsulated = syntax_encoding(transfer_syntax)
    if deflated:
        _walk(inflate_dataset(dataset), False, False, True, "of the inflated dataset ")
    else:
        _walk(dataset, implicit, big, not encapsulated, "")


def _walk(buf: bytes | memoryview, implicit: bool, big: bool, native: bool, where: str) -> None:
    """The walk itself: one loop over elements, an explicit stack of the enclosing containers.

    ``native``: Pixel Data is uncompressed, so its defined length is checked against the image
    attributes. ``where`` qualifies byte offsets in messages."""
    explicit_hdr = _EXPLICIT[big].unpack_from
    tag_len = _TAG_LEN[big].unpack_from
    u32 = _U32[big].unpack_from
    vr_kind = _VR_KIND.get
    sq_tags = _SQ_TAGS
    # the enclosing containers: (limit, mode, undefined, implicit, big, group, elem, start)
    stack: list[tuple[int, int, bool, bool, bool, int, int, int]] = []
    pos = 0
    limit = len(buf)  # where the current container (dataset, item, sequence) ends
    mode = 0  # _DATASET, _SEQUENCE or _FRAGMENTS
    undefined = False  # the current container ends with a delimiter, not at ``limit``
    c_group = c_elem = c_start = 0  # tag and first byte of the current sequence and item
    fragments = 0  # items seen so far in the current encapsulated Pixel Data
    image: dict[int, int] = {}  # top-level group 0028 values that size the pixel data
    pixels: tuple[int, int, int] | None = None  # (elem, offset, length) of top-level pixels

    while True:
        if pos >= limit:  # the current container ends here
            if undefined:
                closer = "item delimiter (FFFE,E00D)" if mode == 0 else "sequence delimiter"
                what = ("item", "sequence", "encapsulated Pixel Data")[mode]
                seqs = _seqs(stack, mode, c_group, c_elem)
                if mode != 0:  # the sequence itself is not closed: name it as the element
                    seqs.pop()
                raise _fail(
                    seqs,
                    where,
                    pos,
                    "(FFFE,E000) item" if mode == 0 else _tag(c_group, c_elem),
                    f"{what} of undefined length starting at byte {c_start} is not closed: "
                    f"its container ends at byte {limit} before its {closer}",
                )
            if not stack:
                break
            limit, mode, undefined, implicit_now, big_now, c_group, c_elem, c_start = stack.pop()
            if implicit_now != implicit or big_now != big:
                implicit, big = implicit_now, big_now
                explicit_hdr = _EXPLICIT[big].unpack_from
                tag_len = _TAG_LEN[big].unpack_from
                u32 = _U32[big].unpack_from
            continue
        if limit - pos < 8:
            what = ("data element", "item", "fragment item")[mode]
            raise _fail(
                _seqs(stack, mode, c_group, c_elem),
                where,
                pos,
                "end",
                f"{limit - pos} byte(s) left where an 8-byte {what} header belongs",
            )

        if mode == 0:  # _DATASET: a data element, or the item delimiter ending this item
            # Fast path: skip ordinary elements (even defined length, not a sequence, not an
            # item, not group 0028 or 7FE0 and up) in a tight loop; anything else breaks out
            # to be read again below, where every case is handled and reported.
            if implicit:
                while limit - pos >= 8:
                    group, elem, length = tag_len(buf, pos)
                    if length & 1 or group == 0x0028 or group >= 0x7FE0:
                        break
                    if (group << 16 | elem) in sq_tags:
                        break
                    end = pos + 8 + length
                    if end > limit:
                        break
                    pos = end
                else:
                    continue
            else:
                while limit - pos >= 8:
                    group, elem, vr, length = explicit_hdr(buf, pos)
                    if vr_kind(vr, -2) or length & 1 or group == 0x0028 or group >= 0x7FE0:
                        break
                    end = pos + 8 + length
                    if end > limit:
                        break
                    pos = end
                else:
                    continue
            if implicit:
                group, elem, length = tag_len(buf, pos)
                start = pos + 8
                kind = 2 if (group << 16 | elem) in sq_tags else 0
                if group == 0xFFFE:
                    kind = -1
            else:
                group, elem, vr, length = explicit_hdr(buf, pos)
                if group == 0xFFFE:  # items and delimiters have no VR
                    length = u32(buf, pos + 4)[0]
                    kind = -1
                    start = pos + 8
                else:
                    kind = vr_kind(vr, -2)
                    if kind == 0:
                        start = pos + 8
                    elif kind > 0:
                        if limit - pos < 12:
                            raise _fail(
                                _seqs(stack, mode, c_group, c_elem),
                                where,
                                pos,
                                _tag(group, elem),
                                "element header cut short",
                            )
                        length = u32(buf, pos + 8)[0]
                        start = pos + 12
                    else:
                        raise _fail(
                            _seqs(stack, mode, c_group, c_elem),
                            where,
                            pos,
                            _tag(group, elem),
                            f"{bytes(vr)!r} is not a value representation",
                        )
            if kind == -1:
                if elem == 0xE00D and undefined:  # the end of an item of undefined length
                    if length:
                        raise _fail(
                            _seqs(stack, mode, c_group, c_elem),
                            where,
                            pos,
                            "(FFFE,E00D)",
                            f"item delimiter of length {length}, not 0",
                        )
                    pos = start
                    limit, mode, undefined, implicit_now, big_now, c_group, c_elem, c_start = (
                        stack.pop()
                    )
                    if implicit_now != implicit or big_now != big:
                        implicit, big = implicit_now, big_now
                        explicit_hdr = _EXPLICIT[big].unpack_from
                        tag_len = _TAG_LEN[big].unpack_from
                        u32 = _U32[big].unpack_from
                    continue
                raise _fail(
                    _seqs(stack, mode, c_group, c_elem),
                    where,
                    pos,
                    _tag(group, elem),
                    "an item or delimiter where a data element belongs",
                )
            if length == 0xFFFFFFFF:
                if group == 0x7FE0 and elem == 0x0010:
                    next_mode = 2  # encapsulated Pixel Data (PS3.5 A.4)
                elif implicit or kind in {2, 3}:  # 3: UN, OB, OW: implicit VR LE (PS3.5 6.2.2)
                    next_mode = 1
                else:
                    raise _fail(
                        _seqs(stack, mode, c_group, c_elem),
                        where,
                        pos,
                        _tag(group, elem),
                        f"undefined length for VR {bytes(vr).decode()}",
                    )
                stack.append((limit, mode, undefined, implicit, big, c_group, c_elem, c_start))
                c_group, c_elem, c_start = group, elem, pos
                mode, undefined, fragments = next_mode, True, 0
                pos = start
                if kind == 3 and (not implicit or big):
                    implicit, big = True, False
                    tag_len = _TAG_LEN[False].unpack_from
                    u32 = _U32[False].unpack_from
                continue
            if length & 1:
                raise _fail(
                    _seqs(stack, mode, c_group, c_elem),
                    where,
                    pos,
                    _tag(group, elem),
                    f"odd value length {length} (PS3.5 7.1.1)",
                )
            end = start + length
            if end > limit:
                raise _fail(
                    _seqs(stack, mode, c_group, c_elem),
                    where,
                    pos,
                    _tag(group, elem),
                    f"value length {length} runs past the end of the "
                    f"{'item' if stack else 'dataset'} ({limit - start} byte(s) remain)",
                )
            if kind == 2:  # a sequence of defined length: walk its items
                stack.append((limit, mode, undefined, implicit, big, c_group, c_elem, c_start))
                c_group, c_elem, c_start = group, elem, pos
                mode, undefined, limit = 1, False, end
                pos = start
                continue
            if group in {0x0028, 0x7FE0} and not stack:
                if group == 0x7FE0:
                    if elem in {_PIXEL_DATA, _FLOAT_PIXELS, _DOUBLE_PIXELS}:
                        pixels = (elem, pos, length)
                elif elem == _PHOTOMETRIC:
                    image[elem] = bytes(buf[start:end]).rstrip(b" \0") in _SUBSAMPLED
                elif elem == _FRAMES:
                    with suppress(ValueError):  # unreadable: counts as 1 frame, the least
                        image[elem] = int(bytes(buf[start:end]).strip(b" \0") or b"1")
                elif elem in (_SAMPLES, _ROWS, _COLUMNS, _BITS) and length == 2:
                    image[elem] = _U16[big].unpack_from(buf, start)[0]
            pos = end

        elif mode == 1:  # _SEQUENCE: an item, or the delimiter ending a sequence
            group, elem, length = tag_len(buf, pos)
            if group == 0xFFFE and elem == 0xE000:
                stack.append((limit, mode, undefined, implicit, big, c_group, c_elem, c_start))
                c_start = pos
                pos += 8
                mode = 0
                if length == 0xFFFFFFFF:
                    undefined = True
                else:
                    end = pos + length
                    if end > limit:
                        raise _fail(
                            _seqs(stack, mode, c_group, c_elem),
                            where,
                            c_start,
                            "(FFFE,E000)",
                            f"item length {length} runs past the end of its sequence "
                            f"({limit - pos} byte(s) remain)",
                        )
                    undefined, limit = False, end
            elif group == 0xFFFE and elem == 0xE0DD and undefined:
                if length:
                    raise _fail(
                        _seqs(stack, mode, c_group, c_elem),
                        where,
                        pos,
                        "(FFFE,E0DD)",
                        f"sequence delimiter of length {length}, not 0",
                    )
                pos += 8
                limit, mode, undefined, implicit_now, big_now, c_group, c_elem, c_start = (
                    stack.pop()
                )
                if implicit_now != implicit or big_now != big:
                    implicit, big = implicit_now, big_now
                    explicit_hdr = _EXPLICIT[big].unpack_from
                    tag_len = _TAG_LEN[big].unpack_from
                    u32 = _U32[big].unpack_from
            else:
                closer = " or a sequence delimiter (FFFE,E0DD)" if undefined else ""
                raise _fail(
                    _seqs(stack, mode, c_group, c_elem),
                    where,
                    pos,
                    _tag(group, elem),
                    f"an item (FFFE,E000){closer} belongs here",
                )

        else:  # _FRAGMENTS: encapsulated Pixel Data (PS3.5 A.4)
            group, elem, length = tag_len(buf, pos)
            if group == 0xFFFE and elem == 0xE000:
                if length == 0xFFFFFFFF:
                    raise _fail(
                        _seqs(stack, mode, c_group, c_elem),
                        where,
                        pos,
                        "(FFFE,E000)",
                        "a pixel data item of undefined length",
                    )
                if length & 1:
                    raise _fail(
                        _seqs(stack, mode, c_group, c_elem),
                        where,
                        pos,
                        "(FFFE,E000)",
                        f"odd pixel data item length {length}",
                    )
                end = pos + 8 + length
                if end > limit:
                    raise _fail(
                        _seqs(stack, mode, c_group, c_elem),
                        where,
                        pos,
                        "(FFFE,E000)",
                        f"pixel data item length {length} runs past the end of the data "
                        f"({limit - pos - 8} byte(s) remain)",
                    )
                fragments += 1
                pos = end
            elif group == 0xFFFE and elem == 0xE0DD and fragments:
                if length:
                    raise _fail(
                        _seqs(stack, mode, c_group, c_elem),
                        where,
                        pos,
                        "(FFFE,E0DD)",
                        f"sequence delimiter of length {length}, not 0",
                    )
                pos += 8
                limit, mode, undefined, implicit, big, c_group, c_elem, c_start = stack.pop()
            else:
                what = (
                    "a fragment item (FFFE,E000) or the sequence delimiter (FFFE,E0DD)"
                    if fragments
                    else "the Basic Offset Table item (FFFE,E000)"
                )
                raise _fail(
                    _seqs(stack, mode, c_group, c_elem),
                    where,
                    pos,
                    _tag(group, elem),
                    f"{what} belongs here",
                )

    if native and pixels is not None:
        _check_pixel_length(pixels, image, where)


def _seqs(
    stack: list[tuple[int, int, bool, bool, bool, int, int, int]], mode: int, group: int, elem: int
) -> list[str]:
    """The tags of the sequences enclosing the walk's position, outermost first."""
    seqs = [_tag(f[5], f[6]) for f in stack if f[1] != _DATASET]
    if mode != _DATASET:
        seqs.append(_tag(group, elem))
    return seqs


def _fail(seqs: list[str], where: str, at: int, tag: str, what: str) -> MalformedDatasetError:
    """The error for a walk that broke at byte ``at``, in ``tag`` inside ``seqs``."""
    inside = f" inside {' > '.join(seqs)}" if seqs else ""
    return MalformedDatasetError(f"malformed dataset at byte {at} {where}{tag}{inside}: {what}")


def _check_pixel_length(pixels: tuple[int, int, int], image: dict[int, int], where: str) -> None:
    """Native pixel data must hold every frame (PS3.5 8.1.1; PS3.3 C.7.6.3.1)."""
    elem, at, length = pixels
    bits = {_PIXEL_DATA: image.get(_BITS), _FLOAT_PIXELS: 32, _DOUBLE_PIXELS: 64}[elem]
    rows, columns, samples = image.get(_ROWS), image.get(_COLUMNS), image.get(_SAMPLES)
    if bits is None or rows is None or columns is None or samples is None:
        return  # an attribute is missing: nothing to check against
    frames = image.get(_FRAMES, 1)
    per_pixel = 2 * bits if image.get(_PHOTOMETRIC) and samples == 3 else samples * bits
    need = (rows * columns * frames * per_pixel + 7) // 8
    need += need & 1
    if length < need:
        raise MalformedDatasetError(
            f"malformed dataset at byte {at} {where}{_tag(0x7FE0, elem)}: pixel data of "
            f"{length} bytes where {rows} rows x {columns} columns x {samples} samples x "
            f"{bits} bits x {frames} frame(s) need {need}"
        )
