"""Secondary-index keys and C-FIND probes, as pure functions over strings.

The index narrows C-FIND candidates; ``matching.matches`` still decides. So every probe here
must find a *superset* of what ``matches`` accepts: a value that matches a query always has a
key the query's probes reach. How each kind of key keeps that promise:

- ``EXACT`` (PatientID, AccessionNumber, modalities: case-sensitive strings): the stripped value.
  A single value is one key; a wild card pattern is a prefix scan over its literal head (the
  characters before the first ``*``/``?``), or, when it starts with a wild card, a scan of the
  whole index filtered by the pattern's literal chunks.
- ``NAME`` (PN, matched case-insensitively): ``fold`` of the value (``str.casefold``, with
  dotless/dotted I folded to ``i``), a function of the value's casefold, so an exact PN query
  (casefold equality) finds its values. A wild card's literal head is used up to its first
  non-ASCII character: ``re.IGNORECASE`` equates an ASCII letter only with its other case and
  with U+212A KELVIN SIGN, U+017F LONG S, U+0130 and U+0131 (dotted and dotless I), which
  ``fold`` maps to the same ASCII letter.
- ``DATE``: the value as matching normalises it (PS3.4 C.2.2.2.5); a value that does not name
  one day (a partial date) goes to an "irregular" section every range probe reads in full.
- ``TIME``: the value normalised to the start of the period it names; a range probe starts at
  the hour of its lower bound, since a value of an earlier instant in that hour (``1230``)
  still matches ``123015-`` (its period ends after it). Values without a two-digit hour are
  irregular.

Keys longer than ``MAX_KEY`` bytes are cut (LMDB keys and dupsort values stop at 511 bytes); a
cut key is still a prefix of the real one, and probes are cut the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from p2pacs.dicom.header import AttrValue
from p2pacs.index.matching import is_wildcard_vr, matches, normalize, vr_of

__all__ = [
    "IRREGULAR",
    "MAX_KEY",
    "Exact",
    "Kind",
    "Prefix",
    "Probe",
    "Range",
    "Scan",
    "fold",
    "probes",
    "uid_list",
    "value_keys",
]

MAX_KEY = 400  # bytes of an index key; LMDB's limit is 511, a study UID is at most 64
IRREGULAR = b"\xff"  # range-index section of values that do not name one instant (never UTF-8)
_TIME_SLACK = 2  # characters of a TM lower bound a range probe keeps (the hour)


class Kind(Enum):
    EXACT = "exact"
    NAME = "name"
    DATE = "date"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class Exact:
    key: bytes


@dataclass(frozen=True, slots=True)
class Prefix:
    prefix: bytes


@dataclass(frozen=True, slots=True)
class Range:
    """Keys from ``low`` to ``high`` inclusive (None: open), plus the irregular section."""

    low: bytes | None
    high: bytes | None


@dataclass(frozen=True, slots=True)
class Scan:
    """Every key of the index that ``accept`` lets through."""

    accept: Callable[[bytes], bool]


Probe = Exact | Prefix | Range | Scan


def _cut(raw: bytes) -> bytes:
    return raw[:MAX_KEY]


def fold(text: str) -> str:
    """The case-insensitive form of a name (see the module docstring)."""
    return text.casefold().replace("\u0131", "i").replace("\u0307", "")


def _values(value: AttrValue | None) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else [value]


def _range_key(kind: Kind, value: str) -> bytes:
    vr = "DA" if kind is Kind.DATE else "TM"
    low, high = normalize(vr, value, False), normalize(vr, value, True)
    regular = low == high if kind is Kind.DATE else low[:_TIME_SLACK] == high[:_TIME_SLACK]
    raw = low.encode()
    if regular and len(raw) <= MAX_KEY:
        return raw
    return IRREGULAR + _cut(value.encode())


def value_keys(kind: Kind, value: AttrValue | None) -> set[bytes]:
    """The index keys of a stored value (one per value of a multi-valued attribute)."""
    keys = set()
    for v in _values(value):
        text = v.strip().rstrip("^") if kind is Kind.NAME else v.strip()
        if not text:
            continue  # an empty value matches no query that can use the index
        if kind is Kind.NAME:
            keys.add(_cut(fold(text).encode()))
        elif kind is Kind.EXACT:
            keys.add(_cut(text.encode()))
        else:
            keys.add(_range_key(kind, text))
    return keys


def _chunks_filter(pattern: str, name: bool) -> Callable[[bytes], bool]:
    """Accept keys holding every literal chunk of a wild card pattern (ASCII runs for names)."""
    chunks: list[bytes] = []
    for part in pattern.replace("?", "*").split("*"):
        if name:
            run = ""
            for ch in [*part, "\x80"]:
                if ch.isascii():
                    run += ch
                elif run:
                    chunks.append(fold(run).encode())
                    run = ""
        elif part:
            chunks.append(part.encode())
    chunks = [c for c in chunks if c]

    def accept(key: bytes) -> bool:
        return len(key) >= MAX_KEY or all(c in key for c in chunks)

    return accept


def _probe(kind: Kind, vr: str, query: str) -> Probe:
    if kind in (Kind.DATE, Kind.TIME):
        rvr = "DA" if kind is Kind.DATE else "TM"
        if "-" in query:
            low_q, _, high_q = query.partition("-")
            low = normalize(rvr, low_q, False) if low_q else None
            high = normalize(rvr, high_q, True) if high_q else None
        else:
            low, high = normalize(rvr, query, False), normalize(rvr, query, True)
        if low is not None and kind is Kind.TIME:
            low = low[:_TIME_SLACK]
        return Range(None if low is None else low.encode(), None if high is None else high.encode())
    name = kind is Kind.NAME
    if is_wildcard_vr(vr) and ("*" in query or "?" in query):
        head = query[: min(i for i, ch in enumerate(query) if ch in "*?")]
        if name:
            ascii_head = ""
            for ch in head:
                if not ch.isascii():
                    break
                ascii_head += ch
            head = fold(ascii_head)
        if head:
            return Prefix(_cut(head.encode()))
        return Scan(_chunks_filter(query, name))
    return Exact(_cut((fold(query) if name else query).encode()))


def probes(keyword: str, kind: Kind, query: str | list[str] | None) -> list[Probe] | None:
    """Probes whose keys hold every value of ``keyword`` that matches ``query``; None when the
    index cannot narrow (universal matching, or a query an empty value would match)."""
    if query is None or matches(keyword, query, None):
        return None  # an absent value matches: every record is a candidate
    vr = vr_of(keyword)
    if kind in (Kind.DATE, Kind.TIME) and vr not in ("DA", "TM"):
        return None
    parts = query if isinstance(query, list) else query.split("\\")
    return [_probe(kind, vr, q.strip()) for q in parts if q != ""]


def uid_list(keyword: str, query: str | list[str] | None) -> list[str] | None:
    """The UIDs of a UID (list) query, in order, or None when it is universal."""
    if query is None or matches(keyword, query, None):
        return None
    parts = query if isinstance(query, list) else query.split("\\")
    return list(dict.fromkeys(q.strip() for q in parts if q != ""))
