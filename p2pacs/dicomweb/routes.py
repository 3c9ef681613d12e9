"""The DICOMweb service as an aiohttp application over an ``Archive``: QIDO-RS, WADO-RS,
STOW-RS (PS3.18). No server or configuration of its own: the site's web server mounts it,
``app.add_subapp("/dicomweb", dicomweb_app(archive))``.

Handlers (``qido_rs``, ``wado_rs``, ``stow_rs``) run on the event loop and hand every index
read, blob read, conversion and write to a worker thread (``asyncio.to_thread``), one instance
at a time, so nothing that walks the archive or decodes pixels runs on the loop. Multipart
responses are streamed part by part.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from aiohttp import web

from p2pacs.archive import Archive
from p2pacs.dicomweb.federated import Federation
from p2pacs.dicomweb.metastore import MetadataWarmer
from p2pacs.dicomweb.qido_rs import QidoRS
from p2pacs.dicomweb.shared import PATTERNS, ROUTES
from p2pacs.dicomweb.stow_rs import Ingest, StowRS
from p2pacs.dicomweb.wado_rs import WadoRS

__all__ = ["dicomweb_app"]


def _iter_routes(qido: QidoRS, wado: WadoRS, stow: StowRS) -> Iterator[web.RouteDef]:
    for name, path in ROUTES.items():
        kind = name.split("_", 1)[0]
        handler = {
            "qido": qido.search,
            "wado": wado.retrieve,
            "meta": wado.metadata,
            "frames": wado.frames,
            "bulkdata": wado.bulkdata,
            "rendered": wado.rendered,
            "thumbnail": wado.rendered,
        }[kind]
        yield web.get(path, handler, name=name, allow_head=False)
    yield web.post(PATTERNS["stow"], stow.store, name="stow")
    yield web.post(PATTERNS["stow_study"], stow.store, name="stow_study")


def dicomweb_app(
    archive: Archive,
    *,
    ingest: Ingest | None = None,
    federation: Federation | None = None,
    ae_title: str = "",
    warm: bool = True,
) -> web.Application:
    """The DICOMweb service over ``archive`` as an aiohttp application to mount as a sub-app
    (``parent.add_subapp("/dicomweb", dicomweb_app(archive))``) or to run on its own.

    ``ingest``: where STOW-RS instances go, called as ``ingest(dataset, transfer_syntax,
    prefix)`` returning a future that completes once the instance is durable (default:
    ``archive.submit``, the C-STORE path). ``federation``: the members searched by
    ``federation=true`` and the source of studies not held here (read-through WADO-RS);
    ``ae_title``: this site's, named in federated results (RetrieveAETitle). ``warm``: build
    each ingested instance's ``/metadata`` in a background thread while the app runs
    (metastore.py), so a series' first ``/metadata`` is read, not built."""
    app = web.Application()  # STOW-RS bodies are read part by part, not bounded as a whole
    wado = WadoRS(archive, federation)
    qido, stow = QidoRS(archive, federation, ae_title), StowRS(archive, ingest)
    app.add_routes(list(_iter_routes(qido, wado, stow)))
    if warm:  # every instance ingested while the app runs gets its /metadata built at once
        warmer = MetadataWarmer(wado.meta_store)
        archive.on_ingest(warmer.offer)

        async def start(_app: web.Application) -> None:
            warmer.start()

        async def stop(_app: web.Application) -> None:
            await asyncio.to_thread(warmer.stop)

        app.on_startup.append(start)
        app.on_cleanup.append(stop)
    return app
