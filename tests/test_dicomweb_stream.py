"""WADO-RS instance streaming (p2pacs/dicomweb/stream.py): blobs read into reused buffers,
Content-Length when every instance goes as stored, hash checks remembered for a while, a
corrupt blob never sent. Real LMDB archive, the app served on 127.0.0.1 port 0, aiohttp's
client."""

from __future__ import annotations

import email.parser
import email.policy
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pydicom
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from p2pacs.archive import Archive
from p2pacs.dicom import split_part10
from p2pacs.dicom.transcode import Plan
from p2pacs.dicomweb import dicomweb_app, stream
from p2pacs.dicomweb.stream import BufferPool, VerifiedBlobs
from p2pacs.errors import CorruptBlobError, StoreError
from p2pacs.samples import generate_instances
from p2pacs.store import hashed_bytes
from p2pacs.store.layout import chunk_key, digest_of

AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
EXPLICIT = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'


def _corrupt(archive: Archive, h: str, n: int = 0) -> None:
    """Flip one byte of chunk ``n`` of blob ``h``."""
    key = chunk_key(digest_of(h), n)
    chunks = archive.blobs._chunks  # type: ignore[attr-defined]
    with archive.db.env.begin(write=True) as txn:
        bad = bytearray(txn.get(key, db=chunks))
        bad[len(bad) // 2] ^= 0xFF
        txn.put(key, bytes(bad), db=chunks)


def _parts(content_type: str, body: bytes) -> list[bytes]:
    """The part bodies of a multipart response, parsed by the standard library."""
    head = f"Content-Type: {content_type}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    return [p.get_payload(decode=True) for p in msg.iter_parts()]  # type: ignore[attr-defined]


async def _get(url: str, accept: str) -> tuple[dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": accept}) as r,
    ):
        assert r.status == 200
        return dict(r.headers), await r.read()


def test_read_into_copies_the_blob_and_checks_its_hash(archive: Archive) -> None:
    small = bytes(range(256)) * 100
    large = np.random.default_rng(1).bytes(2 * archive.blobs.chunk_size + 12345)  # 3 chunks
    for data in (small, large):
        h = archive.blobs.put(data)
        buf = bytearray(len(data) + 10)
        assert archive.blobs.read_into(h, memoryview(buf)) == len(data)
        assert bytes(buf[: len(data)]) == data
        with pytest.raises(StoreError, match="cannot hold"):
            archive.blobs.read_into(h, memoryview(bytearray(len(data) - 1)))
    h = archive.blobs.put(large)
    _corrupt(archive, h, 1)
    with pytest.raises(CorruptBlobError, match="hash check"):
        archive.blobs.read_into(h, memoryview(bytearray(len(large))))
    out = bytearray(len(large))  # unverified: the bytes as stored
    assert archive.blobs.read_into(h, memoryview(out), verify=False) == len(large)
    assert bytes(out) != large


def test_verified_blobs_expire_and_are_bounded() -> None:
    v = VerifiedBlobs(ttl=60.0, capacity=2)
    assert not v.fresh("a")
    v.checked("a")
    v.checked("b")
    assert v.fresh("a") and v.fresh("b")
    v.checked("c")  # past the capacity: the oldest check is forgotten
    assert not v.fresh("a") and v.fresh("b") and v.fresh("c")
    stale = VerifiedBlobs(ttl=-1.0)
    stale.checked("a")
    assert not stale.fresh("a")


def test_buffer_pool_reuses_its_buffers_and_keeps_a_few() -> None:
    pool = BufferPool(size=1024, keep=1)
    a = pool.take(100)
    assert len(a) == 1024
    pool.give(a)
    assert pool.take(1000) is a
    big = pool.take(5000)  # larger than the pool's size: its own buffer, never kept
    assert len(big) == 5000
    pool.give(big)
    b, c = pool.take(1), pool.take(1)
    pool.give(b)
    pool.give(c)  # beyond keep: dropped
    assert pool.take(1) is b and pool.take(1) is not c


def test_batches_hold_about_read_ahead_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    @dataclass
    class V:
        size: int
        transfer_syntax: str = "1.2.840.10008.1.2.1"

    @dataclass
    class R:
        current: V

    monkeypatch.setattr(stream, "READ_AHEAD", 100)
    same, other = Plan("1.2.840.10008.1.2.1"), Plan("1.2.840.10008.1.2.5")
    items = [(R(V(n)), same) for n in (40, 40, 40, 250, 10, 10)]
    got = stream._batches(items)  # type: ignore[arg-type]
    assert [list(r) for r in got] == [[0, 1, 2], [3], [4, 5]]
    items[1] = (R(V(10)), other)  # converted: the end of a batch
    got = stream._batches(items)  # type: ignore[arg-type]
    assert [list(r) for r in got] == [[0, 1], [2, 3], [4, 5]]
    assert stream._batches([]) == []


@dataclass
class Served:
    url: str
    archive: Archive
    study: str  # the generated study (Explicit VR LE), several batches of instances
    files: dict[str, Path]  # SOP Instance UID -> file
    j2k: tuple[str, str, str]  # (study, series, instance) of a JPEG 2000 lossless file
    app: web.Application


@pytest.fixture
async def served(tmp_path: Path, pydicom_all_files: list[Path]) -> AsyncIterator[Served]:
    paths = generate_instances(
        tmp_path / "gen", studies=1, series_per_study=2, instances_per_series=4, rows=256,
        columns=256, seed=3, implicit_vr_every=3,
    )  # fmt: skip
    j2k = next(p for p in pydicom_all_files if p.name == "MR_small_jp2klossless.dcm")
    archive = Archive(tmp_path / "db", map_size=1 << 30, sync=False)
    files = {}
    for p in [*paths, j2k]:
        archive.import_file(p)
        files[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
    head = pydicom.dcmread(paths[0], stop_before_pixels=True)
    jh = pydicom.dcmread(j2k, stop_before_pixels=True)
    app = dicomweb_app(archive, warm=False)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Served(
            str(server.make_url("")).rstrip("/"),
            archive,
            str(head.StudyInstanceUID),
            files,
            (str(jh.StudyInstanceUID), str(jh.SeriesInstanceUID), str(jh.SOPInstanceUID)),
            app,
        )
    finally:
        await server.close()
        archive.close()


async def test_study_as_stored_has_a_content_length_and_the_stored_bytes(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stream, "READ_AHEAD", 300_000)  # ~2 instances of 128 KiB per batch
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{served.url}/studies/{served.study}", headers={"Accept": AS_STORED}) as r,
    ):
        assert r.status == 200
        body = await r.read()
        assert "Transfer-Encoding" not in r.headers
        assert int(r.headers["Content-Length"]) == len(body)
        parts = _parts(r.headers["Content-Type"], body)
    want = {
        u: p.read_bytes()
        for u, p in served.files.items()
        if str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) == served.study
    }
    assert len(parts) == len(want) == 8
    got = {
        str(pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID): b
        for b in parts
    }
    assert got.keys() == want.keys()
    for uid, data in got.items():  # imported files come back byte for byte, file meta too
        assert data == want[uid]


async def test_converted_instances_are_chunked_with_the_right_pixels(served: Served) -> None:
    study, series, sop = served.j2k
    url = f"{served.url}/studies/{study}/series/{series}/instances/{sop}"
    headers, body = await _get(url, EXPLICIT)
    assert "Content-Length" not in headers  # a conversion's size is not known ahead
    [part] = _parts(headers["Content-Type"], body)
    ds = pydicom.dcmread(io.BytesIO(part))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    original = pydicom.dcmread(served.files[sop])
    assert np.array_equal(ds.pixel_array, original.pixel_array)


async def test_a_checked_blob_is_not_hashed_again_within_the_ttl(served: Served) -> None:
    url = f"{served.url}/studies/{served.study}"
    sizes = [rec.current.size for rec in served.archive.index.study_instances(served.study)]
    before = hashed_bytes()
    headers, body = await _get(url, AS_STORED)
    first = _parts(headers["Content-Type"], body)
    assert hashed_bytes() - before == sum(sizes)  # every blob checked once
    before = hashed_bytes()
    headers, body = await _get(url, AS_STORED)
    assert hashed_bytes() == before  # checked a moment ago: not hashed again
    assert _parts(headers["Content-Type"], body) == first and len(first) == len(sizes)


async def test_a_corrupt_blob_cuts_the_response_short_and_is_never_sent(served: Served) -> None:
    recs = served.archive.index.study_instances(served.study)
    bad = recs[len(recs) // 2]
    _corrupt(served.archive, bad.current.hash)
    url = f"{served.url}/studies/{served.study}"
    got = bytearray()
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Accept": AS_STORED}) as r,
    ):
        assert r.status == 200
        announced = int(r.headers["Content-Length"])
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in r.content.iter_any():
                got += chunk
    assert len(got) < announced
    stored = bytes(split_part10(served.files[bad.sop_uid].read_bytes()).dataset)
    assert stored[-4096:] not in got  # the corrupt instance's bytes never went out
