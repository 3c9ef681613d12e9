"""Fixtures for the dht tests: one in-process federation CA per session."""

from __future__ import annotations

import pytest

from dht.membership import FederationCA, create_federation


@pytest.fixture(scope="session")
def ca() -> FederationCA:
    return create_federation("test")
