"""C-FIND: Patient Root and Study Root queries answered from the index (PS3.4 C.4.1)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import evt

from p2pacs.dicom import Level
from p2pacs.errors import P2PacsError
from p2pacs.gateway import status
from p2pacs.index import DicomIndex

__all__ = ["FindHandler", "Query", "parse_identifier"]

log = logging.getLogger(__name__)

Query = dict[str, str | list[str] | None]
_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet"}


def parse_identifier(identifier: Dataset) -> tuple[Level, Query]:
    """The level and the keyword -> match string map of a C-FIND/MOVE/GET identifier."""
    try:
        level = Level(str(identifier.QueryRetrieveLevel).strip().upper())
    except (AttributeError, ValueError):
        raise ValueError("the identifier has no valid QueryRetrieveLevel") from None
    query: Query = {}
    for elem in identifier:
        keyword = elem.keyword
        if not keyword or keyword in _SKIP or elem.VR == "SQ":
            continue
        value = elem.value
        if value is None or value == "":
            query[keyword] = ""
        elif isinstance(value, MultiValue):
            query[keyword] = [str(v) for v in value]
        else:
            query[keyword] = str(value)
    return level, query


def _response(level: Level, query: Query, record: dict[str, Any]) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    for keyword in query:
        value = record.get(keyword, "")
        try:
            dictionary_VR(keyword)
        except KeyError:
            continue
        setattr(ds, keyword, list(value) if isinstance(value, list) else value)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID"):
        if keyword in record and keyword not in ds and keyword in query:
            setattr(ds, keyword, record[keyword])
    return ds


class FindHandler:
    def __init__(self, index: DicomIndex):
        self.index = index

    def __call__(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            level, query = parse_identifier(event.identifier)
        except Exception as exc:
            log.warning("C-FIND with a bad identifier: %s", exc)
            yield status.IDENTIFIER_DOES_NOT_MATCH, None
            return
        try:
            for record in self.index.find(level, query):
                if event.is_cancelled:
                    yield status.CANCEL, None
                    return
                yield status.PENDING, _response(level, query, record)
        except P2PacsError as exc:
            log.error("C-FIND failed: %s", exc)
            yield status.UNABLE_TO_PROCESS, None
