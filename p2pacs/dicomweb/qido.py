"""QIDO-RS without sockets: query parameters to an index query, index rows to DICOM JSON.

PS3.18 8.3.4 (query parameters) and 10.6 (Search Transaction); matching is the C-FIND matching
of ``p2pacs.index`` (wildcards, ranges, UID lists; fuzzy matching is not supported and is
ignored with a warning, as 8.3.4.5 allows). DICOM JSON (PS3.18 F.2) is pydicom's
``Dataset.to_json_dict``: values are typed for their VR first, as C-FIND responses are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from p2pacs.dicom import LEVEL_KEYS, Level
from p2pacs.errors import P2PacsError

__all__ = [
    "DEFAULT_KEYS",
    "QidoError",
    "QidoQuery",
    "parse_query",
    "row_to_json",
]

MAX_LIMIT = 10_000  # results per QIDO response when the client asks for more (or for none)

# PS3.18 Tables 10.6.3-3 to -5: attributes every result carries at each level (those the
# index holds; RetrieveURL and InstanceAvailability are added by ``row_to_json``)
DEFAULT_KEYS: Mapping[Level, tuple[str, ...]] = {
    Level.STUDY: (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    Level.SERIES: (
        "Modality",
        "SeriesDescription",
        "SeriesInstanceUID",
        "SeriesNumber",
        "PerformedProcedureStepStartDate",
        "PerformedProcedureStepStartTime",
        "NumberOfSeriesRelatedInstances",
        "StudyInstanceUID",
    ),
    Level.IMAGE: (
        "SOPClassUID",
        "SOPInstanceUID",
        "InstanceNumber",
        "Rows",
        "Columns",
        "BitsAllocated",
        "NumberOfFrames",
        "StudyInstanceUID",
        "SeriesInstanceUID",
    ),
}
_ABOVE = {
    Level.STUDY: (Level.PATIENT, Level.STUDY),
    Level.SERIES: (Level.PATIENT, Level.STUDY, Level.SERIES),
    Level.IMAGE: (Level.PATIENT, Level.STUDY, Level.SERIES, Level.IMAGE),
}
_UID_VR = "UI"
_INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "US or SS"})
_FLOAT_VRS = frozenset({"FL", "FD"})
_CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "federation"}


class QidoError(P2PacsError):
    """A QIDO-RS query the service cannot run (answered 400 Bad Request with the reason)."""


@dataclass
class QidoQuery:
    """A parsed QIDO-RS request: what the index matches and what each result carries."""

    level: Level
    match: dict[str, str | list[str] | None]  # keyword -> C-FIND match string (or UID list)
    keys: list[str]  # keywords each result carries (the match keys among them)
    limit: int = MAX_LIMIT
    offset: int = 0
    warnings: list[str] = field(default_factory=list)
    federation: bool = False  # also search every live member of the federation

    def index_query(self) -> dict[str, str | list[str] | None]:
        """The query handed to ``DicomIndex.find``: match keys plus universal return keys."""
        out: dict[str, str | list[str] | None] = dict.fromkeys(self.keys, "")
        out.update(self.match)
        return out


def _keyword(name: str) -> str:
    """A query parameter's attribute keyword: a keyword or eight hex digits (PS3.18 8.3.4.1)."""
    if len(name) == 8 and all(c in "0123456789abcdefABCDEF" for c in name):
        keyword = keyword_for_tag(int(name, 16))
        if keyword:
            return keyword
        raise QidoError(f"unknown attribute tag {name}")
    if tag_for_keyword(name) is None:
        raise QidoError(f"unknown query parameter or attribute keyword {name!r}")
    return name


def _number(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise QidoError(f"{name} must be a whole number, not {text!r}") from None
    if value < 0:
        raise QidoError(f"{name} must not be negative")
    return value


def parse_query(
    level: Level,
    params: Iterable[tuple[str, str]],
    fixed: Mapping[str, str] | None = None,
) -> QidoQuery:
    """Parse QIDO-RS query parameters (repeated parameters allowed) for a search at ``level``.

    ``fixed``: UIDs from the path (``/studies/{uid}/series``). Raises ``QidoError``."""
    match: dict[str, str | list[str] | None] = {}
    include: list[str] = []
    query = QidoQuery(level, match, [])
    for name, value in params:
        if name == "includefield":
            for item in value.split(","):
                wanted = item.strip()
                if wanted == "all":
                    include += [kw for lv in _ABOVE[level] for kw in LEVEL_KEYS[lv]]
                elif wanted:
                    include.append(_keyword(wanted))
        elif name == "limit":
            query.limit = min(_number(name, value), MAX_LIMIT)
        elif name == "offset":
            query.offset = _number(name, value)
        elif name == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise QidoError(f"fuzzymatching must be true or false, not {value!r}")
            if value.lower() == "true":
                query.warnings.append("fuzzymatching is not supported; exact matching used")
        elif name == "federation":
            if value.lower() not in ("true", "false"):
                raise QidoError(f"federation must be true or false, not {value!r}")
            query.federation = value.lower() == "true"
        elif name in _CONTROL:
            continue
        else:
            keyword = _keyword(name)
            if keyword in match:
                raise QidoError(f"{keyword} is given twice")
            match[keyword] = _match_value(keyword, value)
    for keyword, uid in (fixed or {}).items():
        if keyword in match and match[keyword] not in ("", uid):
            raise QidoError(f"{keyword} in the query differs from the one in the path")
        match[keyword] = uid
    keys = list(DEFAULT_KEYS[level])
    keys += [k for k in include if k not in keys]
    keys += [k for k in match if k not in keys]
    query.keys = keys
    return query


def _match_value(keyword: str, value: str) -> str | list[str]:
    """UID list matching takes values separated by commas (PS3.18 8.3.4.1) or backslashes."""
    if dictionary_VR(keyword) == _UID_VR and ("," in value or "\\" in value):
        return [v.strip() for v in value.replace("\\", ",").split(",") if v.strip()]
    return value


def _typed(vr: str, value: Any) -> Any:
    """An index value (DICOM strings) as pydicom takes it for ``vr``."""
    values = list(value) if isinstance(value, list | tuple) else [value]
    if vr not in _INT_VRS and vr not in _FLOAT_VRS:
        return values if isinstance(value, list | tuple) else value
    convert = int if vr in _INT_VRS else float
    try:
        out = [convert(str(v).strip()) for v in values if str(v).strip()]
    except ValueError:
        return None
    if not out:
        return None
    return out if len(out) > 1 else out[0]


def row_to_json(
    keys: Iterable[str],
    row: Mapping[str, Any],
    retrieve_url: str | None = None,
    *,
    ae_titles: Sequence[str] = (),
    availability: str = "ONLINE",
) -> dict[str, Any]:
    """One QIDO-RS result as DICOM JSON: ``keys`` from the index row (absent or empty values
    are sent without a Value), plus RetrieveURL, InstanceAvailability (``availability``) and,
    when given, RetrieveAETitle (the AE titles of the sites holding it)."""
    ds = Dataset()
    for keyword in keys:
        value = row.get(keyword, "")
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            continue
        typed = None if value in ("", None, []) else _typed(vr, value)
        setattr(ds, keyword, typed)
    if retrieve_url is not None:
        ds.RetrieveURL = retrieve_url
    ds.InstanceAvailability = availability
    if ae_titles:
        ds.RetrieveAETitle = list(ae_titles)
    if not all(str(v).isascii() for v in row.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    out: dict[str, Any] = ds.to_json_dict()
    return out
