"""A site serving DICOMweb builds each ingested instance's /metadata in the background and
keeps it in its database (in-process site, STOW-RS over HTTPS with a token)."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import aiohttp
import pydicom

from p2pacs.dicomweb.metastore import MetadataStore
from p2pacs.node import SiteNode

from web_helpers import TOKEN


async def test_stow_then_metadata_is_kept_without_a_request(
    web_node: SiteNode, web_instances: list[Path]
) -> None:
    assert web_node.web is not None and web_node.archive is not None
    tls = ssl.create_default_context(
        cafile=str(web_node.site.path / web_node.site.config.web.tls_cert)
    )
    boundary = "p2pacs-warm-test"
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p.read_bytes()
        + b"\r\n"
        for p in web_instances
    ) + f"--{boundary}--\r\n".encode()  # fmt: skip
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
    }
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as s:
        url = f"{web_node.web.url}/dicomweb/studies"
        async with s.post(url, data=body, headers=headers) as r:
            assert r.status == 200, await r.text()
    archive = web_node.archive
    hashes = []
    for p in web_instances:
        rec = archive.index.instance(_sop(p))
        assert rec is not None
        hashes.append(rec.current.hash)
    fresh = MetadataStore(archive)  # no memory: what a restarted site would read

    async def kept() -> None:
        while len(await asyncio.to_thread(fresh.stored, hashes)) < len(hashes):
            await asyncio.sleep(0.05)

    await asyncio.wait_for(kept(), 30)
    assert fresh.built == 0
    entry = json.loads(fresh.stored(hashes[:1])[hashes[0]])
    assert entry["00080018"]["Value"] == [_sop(web_instances[0])]


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
