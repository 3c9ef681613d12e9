"""Fixtures for the gateway tests: archives on tmp_path and a gateway loaded with pydicom's
test files (every transfer syntax they come in) through real C-STORE associations."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import _config

from p2pacs.archive import Archive

from gw_helpers import Loaded, load, make_gateway


@pytest.fixture
def gw_archive(tmp_path: Path) -> Iterator[Archive]:
    """A fresh archive (real LMDB; no fsync, the gateway tests are not about durability)."""
    arc = Archive(tmp_path / "gw-db", map_size=1 << 30, sync=False)
    try:
        yield arc
    finally:
        arc.close()


@pytest.fixture(scope="module")
def loaded(pydicom_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """Every pydicom test file C-STOREd through the gateway (see ``gw_helpers.load``)."""
    arc = Archive(tmp_path_factory.mktemp("gw-loaded") / "db", map_size=1 << 30, sync=False)
    gw = make_gateway(arc)
    try:
        yield load(gw, arc, pydicom_files)
    finally:
        gw.stop()
        arc.close()


@pytest.fixture
def raw_sends() -> Iterator[None]:
    """pynetdicom sends a file path's dataset bytes unchanged while the test runs."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
