"""C-MOVE and C-GET: send stored instances back, as received or transcoded for the requester.

Each instance goes out as its stored bytes (``rawsend.StoredInstance``) whenever the destination
accepted the transfer syntax it was stored in. Otherwise ``p2pacs.dicom.transcode`` picks a
syntax the destination accepted for its SOP class (uncompressed first, lossless always; lossy
JPEG 2000 only with ``[dicom] lossy_transcoding`` and nothing else accepted) and converts a
copy, which is sent the same way. The stored bytes never change; an instance that cannot be
converted is a counted sub-operation failure, never a corrupt file. The next instance is read
and hash-checked in a thread while the current one goes out (``_read_ahead``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.presentation import PresentationContext

from p2pacs.archive import Archive
from p2pacs.config import DicomConfig, parse_hostport
from p2pacs.dicom import Level, build_prefix
from p2pacs.dicom.scu import association_handlers
from p2pacs.dicom.transcode import choose_target, transcode
from p2pacs.dicom.uids import VERIFICATION
from p2pacs.errors import ConfigError, P2PacsError, TranscodeError
from p2pacs.gateway import status
from p2pacs.gateway.find import Query, answering, parse_identifier
from p2pacs.gateway.rawsend import (
    StoredInstance,
    UnreadableInstance,
    direct_writes,
    install,
    sending,
)
from p2pacs.index import InstanceRecord

__all__ = ["RetrieveHandlers"]

install()

log = logging.getLogger(__name__)
_R = TypeVar("_R")
_T = TypeVar("_T")

MAX_CONTEXTS = 120  # presentation contexts proposed to a C-MOVE destination (128 at most)
# proposed to a C-MOVE destination beside the stored syntaxes, one context per SOP class, so an
# uncompressed-only destination still gets every instance (transcoded)
UNCOMPRESSED_FALLBACK: list[str | UID] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass
class _Refused:
    """Instances of one retrieve that could not be converted: how many, and the first; and
    the syntaxes the peer accepted per SOP class, looked up once per retrieve (the accepted
    contexts do not change while the association is up)."""

    count: int = 0
    first: str = ""
    accepted: dict[str, list[str]] = field(default_factory=dict)


class RetrieveHandlers:
    def __init__(
        self,
        archive: Archive,
        config: DicomConfig,
        ensure_local: Callable[[list[str]], None] | None,
    ):
        self.archive = archive
        self.config = config
        self.ensure_local = ensure_local
        # sub-operations sent as a converted copy, and those failed because no accepted syntax
        # could be delivered (counted for the operator; read without a lock, ints under the GIL)
        self.transcoded = 0
        self.not_convertible = 0

    def _matches(self, unique: Query) -> list[InstanceRecord]:
        """The instances matching ``unique``, after reading the studies it names through."""
        studies = unique.get("StudyInstanceUID")
        uids = studies if isinstance(studies, list) else [studies] if studies else []
        if self.ensure_local is not None and uids:
            try:
                self.ensure_local([u for u in uids if u])
            except P2PacsError as exc:
                log.warning("read-through for %s failed: %s", uids, exc)
            except Exception:
                log.exception("read-through failed")
        records = []
        seen = set()
        for row in self.archive.index.find(Level.IMAGE, unique):
            sop = str(row.get("SOPInstanceUID", ""))
            rec = self.archive.index.instance(sop) if sop and sop not in seen else None
            if rec is not None:
                seen.add(sop)
                records.append(rec)
        return records

    def _datasets(
        self, records: list[InstanceRecord], event: evt.Event, sender: Callable[[], Any]
    ) -> Iterator[tuple[int, Any]]:
        """Pending statuses with the instance to send: ``sender()`` is the association the
        C-STOREs go out on (the requestor's for C-GET, the sub-association for C-MOVE).
        Instances that cannot be converted are logged one by one at DEBUG and summed up in one
        warning per retrieve (a peer asking for a large study in a syntax we cannot make must
        not flood the log)."""
        refused = _Refused()
        try:
            yield from self._each(records, event, sender, refused)
        finally:
            if refused.count:
                log.warning(
                    "%d instance(s) not sent: no syntax the peer accepted could be made for "
                    "them (first: %s)",
                    refused.count,
                    refused.first,
                )

    def _each(
        self,
        records: list[InstanceRecord],
        event: evt.Event,
        sender: Callable[[], Any],
        refused: _Refused,
    ) -> Iterator[tuple[int, Any]]:
        with ThreadPoolExecutor(1, thread_name_prefix="retrieve-read") as reader:
            for rec, loading in _read_ahead(reader, records, self._load):
                if event.is_cancelled:
                    yield status.CANCEL, None
                    return
                try:
                    stored = loading.result()
                except P2PacsError as exc:
                    log.error("cannot send %s: %s", rec.sop_uid, exc)
                    # a failed sub-operation, counted and listed (a None would be skipped)
                    yield status.PENDING, UnreadableInstance(rec.sop_class_uid, rec.sop_uid)
                    continue
                yield status.PENDING, self._deliverable(stored, sender(), refused)

    def _load(self, rec: InstanceRecord) -> StoredInstance:
        """The stored bytes of ``rec``'s current version, hash-checked (a corrupt blob is
        repaired first when the site can)."""
        v = rec.current
        raw = self.archive.blob(v.hash)
        return StoredInstance(rec.sop_class_uid, rec.sop_uid, v.transfer_syntax, v.prefix, raw)

    def _deliverable(self, stored: StoredInstance, assoc: Any, refused: _Refused) -> Dataset:
        """``stored`` itself if ``assoc`` accepted its syntax, else a converted copy, else an
        ``UnreadableInstance`` (a counted failure)."""
        sop_class, sop_uid, ts = stored.p2pacs_ids
        if assoc is None:  # no association to look at: pynetdicom reports what it cannot send
            return stored
        accepted = refused.accepted.get(sop_class)
        if accepted is None:
            accepted = refused.accepted[sop_class] = accepted_syntaxes(assoc, sop_class)
        plan = choose_target(ts, accepted, allow_lossy=self.config.lossy_transcoding)
        if plan is not None and plan.as_stored(ts):
            return stored
        if plan is None:
            why = f"the peer accepted {', '.join(accepted) or 'no syntax'} for its SOP class"
        else:
            try:
                raw = transcode(stored.p2pacs_raw, ts, plan)
            except TranscodeError as exc:
                why = str(exc)
            else:
                self.transcoded += 1
                log.debug("sending %s converted from %s to %s", sop_uid, ts, plan.target)
                prefix = build_prefix(sop_class, sop_uid, plan.target)
                return StoredInstance(sop_class, sop_uid, plan.target, prefix, raw)
        self.not_convertible += 1
        refused.count += 1
        refused.first = refused.first or f"{sop_uid} stored as {ts}: {why}"
        log.debug("cannot send %s (stored as %s): %s", sop_uid, ts, why)
        return UnreadableInstance(sop_class, sop_uid)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        # pynetdicom wants the sub-operation count first; a failure status yielded right after
        # it ends the C-GET with that status (0 would mean "success, nothing matched")
        return answering(log, "C-GET", self._get(event), prefix=[1])

    def _get(self, event: evt.Event) -> Generator[Any, None, None]:
        try:
            unique = _unique_keys(event.identifier)
        except Exception as exc:  # the requestor's identifier, decoded lazily by pydicom
            log.warning("C-GET refused: %s", exc)
            yield 1
            yield status.IDENTIFIER_DOES_NOT_MATCH, None
            return
        records = self._matches(unique)
        yield len(records)
        with sending(event.assoc):
            yield from self._datasets(records, event, lambda: event.assoc)

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        destination = str(event.move_destination).strip()
        address = self._destination(destination)
        if address is None:
            return iter([(None, None)])  # 0xA801, Move Destination unknown
        # pynetdicom takes the destination, then the sub-operation count, then statuses, and
        # opens the association to the destination before reading the first status: to refuse,
        # give it Verification only, so the failure status reaches the requestor
        refusal = (*address, _association([build_context(VERIFICATION)]))
        return answering(log, "C-MOVE", self._move(event, address, refusal), prefix=[refusal, 1])

    def _destination(self, aet: str) -> tuple[str, int] | None:
        address = self.config.destinations.get(aet)
        if address is None:
            log.warning("C-MOVE to unknown destination %r", aet)
            return None
        try:
            return parse_hostport(address)
        except ConfigError as exc:
            log.error("C-MOVE to %r: bad destination address: %s", aet, exc)
            return None

    def _move(
        self, event: evt.Event, address: tuple[str, int], refusal: tuple[Any, ...]
    ) -> Generator[Any, None, None]:
        try:
            unique = _unique_keys(event.identifier)
        except Exception as exc:  # the requestor's identifier, decoded lazily by pydicom
            log.warning("C-MOVE refused: %s", exc)
            yield refusal
            yield 1
            yield status.IDENTIFIER_DOES_NOT_MATCH, None
            return
        records = self._matches(unique)
        sub = _Established()
        contexts = move_contexts((r.sop_class_uid, r.current.transfer_syntax) for r in records)
        yield (*address, _association(contexts, max_pdu=self.config.max_pdu, established=sub))
        yield len(records)
        with sending(event.assoc):
            yield from self._datasets(records, event, lambda: sub.assoc)


def _read_ahead(
    reader: Executor, records: list[_R], load: Callable[[_R], _T]
) -> Iterator[tuple[_R, Future[_T]]]:
    """Each record with its ``load`` under way in ``reader``, the next one's started before
    this one is handed out: while an instance goes out and its C-STORE-RSP is awaited, the
    next is read from LMDB and hash-checked (one instance ahead, so at most two are held)."""
    if not records:
        return
    upcoming = reader.submit(load, records[0])
    for i, rec in enumerate(records):
        current = upcoming
        if i + 1 < len(records):
            upcoming = reader.submit(load, records[i + 1])
        yield rec, current


def move_contexts(stored: Iterable[tuple[str, str]]) -> list[PresentationContext]:
    """Presentation contexts for a C-MOVE sub-association, from the (SOP class, stored
    transfer syntax) pairs of the instances to send: one context per pair with that syntax
    alone (the destination accepts one syntax per context, and each instance should go as
    stored), then per SOP class one context with Explicit and Implicit VR Little Endian, so a
    destination that takes no compressed syntax still receives every instance, transcoded;
    then Verification, which keeps the association up when the destination accepts none of
    the others (those instances then count as failed sub-operations instead of 0xA801). At
    most ``MAX_CONTEXTS`` besides Verification: pairs first."""
    pairs = sorted(set(stored))
    contexts = [build_context(c, [ts]) for c, ts in pairs[:MAX_CONTEXTS]]
    classes = sorted({c for c, ts in pairs if ts != ImplicitVRLittleEndian})
    room = max(0, MAX_CONTEXTS - len(contexts))
    contexts += [build_context(c, UNCOMPRESSED_FALLBACK) for c in classes[:room]]
    contexts.append(build_context(VERIFICATION))
    return contexts


def accepted_syntaxes(assoc: Any, sop_class: str) -> list[str]:
    """The transfer syntaxes ``assoc``'s peer accepted for sending ``sop_class`` as C-STORE
    SCU (one per accepted context, in context order)."""
    return [
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == sop_class and cx.as_scu
    ]


class _Established:
    """``EVT_ESTABLISHED`` handler that remembers the association (a C-MOVE sub-association,
    opened by pynetdicom before it reads the first pending status)."""

    def __init__(self) -> None:
        self.assoc: Any = None

    def __call__(self, event: evt.Event) -> None:
        self.assoc = event.assoc


def _association(
    contexts: list[PresentationContext], established: _Established | None = None, **kw: Any
) -> dict[str, Any]:
    """``AE.associate`` arguments for the association to a C-MOVE destination."""
    handlers: list[Any] = [
        *association_handlers(),
        (evt.EVT_ESTABLISHED, direct_writes),
    ]
    if established is not None:
        handlers.append((evt.EVT_ESTABLISHED, established))
    return {"contexts": contexts, "evt_handlers": handlers, **kw}


def _unique_keys(identifier: Dataset) -> Query:
    """The keys of a retrieve identifier that name what to retrieve (one at least)."""
    level, query = parse_identifier(identifier)
    unique: Query = {k: v for k, v in query.items() if v not in ("", None)}
    if not unique:
        raise ValueError(f"a {level.value} retrieve needs at least one unique key")
    return unique
