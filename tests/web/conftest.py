"""Fixtures of the web tests: a standalone site with its web server on, running in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from p2pacs.node import SiteNode
from p2pacs.samples import generate_instances
from p2pacs.site import Site

from web_helpers import TOKEN, enable_web


@pytest.fixture(scope="session")
def web_instances(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """One study of 6 small instances."""
    out = tmp_path_factory.mktemp("web-instances")
    return generate_instances(
        out, studies=1, series_per_study=2, instances_per_series=3, rows=64, columns=64, seed=3
    )


@pytest.fixture
async def web_node(tmp_path: Path) -> AsyncIterator[SiteNode]:
    """A standalone site, DICOM and HTTPS web server on free ports, with a user and a token."""
    site = Site.init(tmp_path / "site")
    site.config.dicom.port = 0
    site.config.dicom.bind = "127.0.0.1"
    site.config.dicom.workers = 1  # the in-process gateway
    enable_web(site, token=TOKEN)
    node = SiteNode(site)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()
