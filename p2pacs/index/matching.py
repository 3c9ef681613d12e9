"""DICOM attribute matching for C-FIND (PS3.4 C.2.2.2), as pure functions over strings.

Supported: universal matching (empty), single value, list of UIDs (backslash-separated), wild
card ``*``/``?`` for string VRs, range matching for DA/TM/DT, and multi-valued attributes (a
match on any value). Sequence matching is treated as universal. PN matching is
case-insensitive, as PS3.4 C.2.2.2.1 allows and as PACS users expect.
"""

from __future__ import annotations

import re
from functools import lru_cache

from pydicom.datadict import dictionary_VR

__all__ = ["is_wildcard_vr", "matches", "normalize", "vr_of"]

_WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
_RANGE_VRS = frozenset({"DA", "TM", "DT"})


@lru_cache(maxsize=512)
def vr_of(keyword: str) -> str:
    """The VR of a keyword from the data dictionary ("LO" when unknown)."""
    try:
        return str(dictionary_VR(keyword))
    except KeyError:
        return "LO"


@lru_cache(maxsize=1024)
def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    parts = ("." if ch == "?" else ".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)


def _norm_time(value: str, upper: bool) -> str:
    """HHMMSS.FFFFFF, padding a partial time to the start (or end) of the period it names."""
    value = value.replace(":", "").strip()
    whole, _, frac = value.partition(".")
    pad = "235959" if upper else "000000"
    whole = whole + pad[len(whole) :]
    frac = (frac + ("9" if upper else "0") * 6)[:6]
    return f"{whole}.{frac}"


def _norm(vr: str, value: str, upper: bool) -> str:
    value = value.strip()
    if vr == "TM":
        return _norm_time(value, upper)
    if vr == "DA":
        value = value.replace(".", "").replace("-", "")
        return value + ("99999999" if upper else "00000000")[len(value) :]
    if vr == "DT":
        date, time = value[:8], value[8:]
        date = date + ("99999999" if upper else "00000000")[len(date) :]
        return date + _norm_time(time, upper)
    return value


def normalize(vr: str, value: str, upper: bool) -> str:
    """A DA/TM/DT value as matching compares it: padded to the start (or, with ``upper``, the
    end) of the period it names; other VRs are only stripped. The index keys its date and time
    sub-databases with this, so an index range scan and ``matches`` order values alike."""
    return _norm(vr, value, upper)


def is_wildcard_vr(vr: str) -> bool:
    """Does ``*``/``?`` act as a wild card for this VR (PS3.4 C.2.2.2.4)?"""
    return vr in _WILDCARD_VRS


def _match_range(vr: str, query: str, value: str) -> bool:
    low, _, high = query.partition("-")
    if not value:
        return False
    v_low, v_high = _norm(vr, value, False), _norm(vr, value, True)
    if low and v_high < _norm(vr, low, False):
        return False
    return not (high and v_low > _norm(vr, high, True))


def _match_one(vr: str, query: str, value: str) -> bool:
    if vr in _RANGE_VRS:
        if "-" in query:
            return _match_range(vr, query, value)
        return bool(value) and _norm(vr, query, False) <= _norm(vr, value, False) <= _norm(
            vr, query, True
        )
    if vr in _WILDCARD_VRS and ("*" in query or "?" in query):
        return _wildcard(query, vr == "PN").fullmatch(value) is not None
    if vr == "PN":
        return query.casefold() == value.casefold()
    if vr in {"IS", "DS"}:
        try:
            return float(query) == float(value)
        except ValueError:
            return query.strip() == value.strip()
    return query == value


def matches(keyword: str, query: str | list[str] | None, value: str | list[str] | None) -> bool:
    """Does a stored ``value`` match the C-FIND ``query`` for ``keyword``?"""
    if query is None:
        return True
    queries = query if isinstance(query, list) else query.split("\\")
    if all(q in ("", "*") for q in queries):
        return True  # universal matching (C.2.2.2.3), and "*" alone matches empty values too
    vr = vr_of(keyword)
    if vr == "SQ":
        return True
    values = value if isinstance(value, list) else [value or ""]
    values = [v.strip() if vr != "PN" else v.strip().rstrip("^") for v in values]
    return any(_match_one(vr, q.strip(), v) for q in queries for v in values if q != "")
