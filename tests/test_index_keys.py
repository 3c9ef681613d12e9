"""The secondary-index keys never lose a match: whatever ``matching.matches`` accepts, the probes
of the query reach one of the value's keys (the index may over-select, matching decides)."""

from __future__ import annotations

import _sre
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from p2pacs.index.keys import (
    IRREGULAR,
    Exact,
    Kind,
    Prefix,
    Probe,
    Range,
    Scan,
    fold,
    probes,
    uid_list,
    value_keys,
)
from p2pacs.index.matching import matches


def _reaches(probe: Probe, key: bytes) -> bool:
    """What ``Secondary.entries`` reads for a probe, as a predicate on one key."""
    if isinstance(probe, Exact):
        return key == probe.key
    if isinstance(probe, Prefix):
        return key.startswith(probe.prefix)
    if isinstance(probe, Scan):
        return probe.accept(key)
    assert isinstance(probe, Range)
    if key.startswith(IRREGULAR):
        return True
    return (probe.low is None or key >= probe.low) and (probe.high is None or key <= probe.high)


def _found(keyword: str, kind: Kind, query: str, value: str | list[str]) -> bool:
    """Does the index reach ``value`` for ``query`` (None probes: the index is not used)?"""
    found = probes(keyword, kind, query)
    if found is None:
        return True
    keys = value_keys(kind, value)
    return any(_reaches(p, k) for p in found for k in keys)


# names: ASCII letters, their re.IGNORECASE look-alikes, case-expanding and combining letters
_NAME_CHARS = (
    "AaBbIiKkSsZz^ -\u0130\u0131\u017f\u212a\u00df\u1e9e\u0307\u00e9\u00c9\u03a3\u03c3\u03c2"
)
_names = st.text(alphabet=_NAME_CHARS, max_size=8)
_patterns = st.text(alphabet=_NAME_CHARS + "*?", max_size=8)


@settings(max_examples=3000, deadline=None)
@given(value=_names, query=_patterns)
@example(value="\u0130van", query="IV*")
@example(value="\u017fmith", query="SMITH*")
@example(value="\u212aarl", query="karl")
@example(value="Stra\u00dfe", query="STRASSE")
@example(value="Smith^", query="smith")
def test_name_probes_reach_every_match(value: str, query: str) -> None:
    if matches("PatientName", query, value):
        assert _found("PatientName", Kind.NAME, query, value), (value, query)


@settings(max_examples=2000, deadline=None)
@given(
    value=st.text(alphabet="Aa1-. *?", max_size=6), query=st.text(alphabet="Aa1-*?\\ ", max_size=6)
)
def test_exact_probes_reach_every_match(value: str, query: str) -> None:
    for keyword in ("PatientID", "AccessionNumber", "Modality"):
        if matches(keyword, query, value):
            assert _found(keyword, Kind.EXACT, query, value), (keyword, value, query)


_date_parts = st.text(alphabet="0123456789.", max_size=10)


@settings(max_examples=3000, deadline=None)
@given(value=_date_parts, low=_date_parts, high=_date_parts, ranged=st.booleans())
@example(value="2020", low="20200315", high="", ranged=True)
@example(value="20200102", low="20200102", high="20200102", ranged=True)
def test_date_probes_reach_every_match(value: str, low: str, high: str, ranged: bool) -> None:
    query = f"{low}-{high}" if ranged else low
    if matches("StudyDate", query, value):
        assert _found("StudyDate", Kind.DATE, query, value), (value, query)


_time_parts = st.text(alphabet="0123456789.:", max_size=13)


@settings(max_examples=3000, deadline=None)
@given(value=_time_parts, low=_time_parts, high=_time_parts, ranged=st.booleans())
@example(value="1230", low="123015", high="", ranged=True)
@example(value="12", low="125959.5", high="13", ranged=True)
def test_time_probes_reach_every_match(value: str, low: str, high: str, ranged: bool) -> None:
    query = f"{low}-{high}" if ranged else low
    if matches("StudyTime", query, value):
        assert _found("StudyTime", Kind.TIME, query, value), (value, query)


def test_multi_valued_and_lists() -> None:
    assert _found("ModalitiesInStudy", Kind.EXACT, "MR", ["CT", "MR"])
    assert _found("PatientID", Kind.EXACT, "X\\P1", "P1")
    assert not _found("PatientID", Kind.EXACT, "X\\P1", "P2")
    assert _found("PatientName", Kind.NAME, "doe*\\smith*", "SMITH^JOHN")


def test_universal_and_empty_matching_queries_do_not_use_the_index() -> None:
    for query in ("", "*", "**", " ", "\\", "*\\X"):
        assert probes("PatientName", Kind.NAME, query) is None, query
        assert probes("PatientID", Kind.EXACT, query) is None, query
    assert probes("StudyDate", Kind.DATE, "") is None
    assert uid_list("StudyInstanceUID", "") is None
    assert uid_list("StudyInstanceUID", "1.2\\1.3 \\1.2") == ["1.2", "1.3"]


def test_probe_shapes() -> None:
    assert probes("PatientName", Kind.NAME, "SMITH*") == [Prefix(b"smith")]
    assert probes("PatientName", Kind.NAME, "Smith^John") == [Exact(b"smith^john")]
    assert probes("PatientID", Kind.EXACT, "P12?4") == [Prefix(b"P12")]
    assert probes("StudyDate", Kind.DATE, "20200101-20200131") == [Range(b"20200101", b"20200131")]
    assert probes("StudyDate", Kind.DATE, "-20200131") == [Range(None, b"20200131")]
    assert probes("StudyTime", Kind.TIME, "0930-") == [Range(b"09", None)]
    [scan] = probes("PatientName", Kind.NAME, "*^JOHN") or []
    assert isinstance(scan, Scan)
    assert scan.accept(b"smith^john") and not scan.accept(b"smith^anna")
    assert value_keys(Kind.DATE, "2020") == {IRREGULAR + b"2020"}
    assert value_keys(Kind.TIME, "1230") == {b"123000.000000"}
    assert value_keys(Kind.NAME, ["  Smith^John^^ ", ""]) == {b"smith^john"}


def test_fold_covers_every_ignorecase_equivalent_of_ascii() -> None:
    """Every code point ``re.IGNORECASE`` equates with an ASCII character folds to it."""
    extra = {chr(k): [chr(c) for c in v] for k, v in re._casefix._EXTRA_CASES.items()}  # type: ignore[attr-defined]
    for cp in range(0x80, 0x110000):
        low = chr(_sre.unicode_tolower(cp))
        ascii_twins = [low] if low.isascii() else []
        ascii_twins += [a for a, others in extra.items() if a.isascii() and chr(cp) in others]
        for twin in ascii_twins:
            assert re.fullmatch(re.escape(twin), chr(cp), re.IGNORECASE)
            assert fold(chr(cp)) == fold(twin), hex(cp)
