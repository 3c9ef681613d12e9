"""mDNS discovery: members find each other, other federations are ignored; on loopback, and
across two network namespaces joined by a bridge (root only)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dht.membership import create_federation
from p2pacs.discovery import DiscoveredSite, Discovery, parse_service
from p2pacs.federation.identity import create_federation_dir, enroll_site
from p2pacs.site import Site

from fed_helpers import make_identity
from netns_helpers import Lan, netns_available

pytestmark = pytest.mark.timeout(60)

HERE = Path(__file__).parent


def test_parse_service_filters_federation_and_bad_records() -> None:
    props: dict[bytes, bytes | None] = {
        b"id": b"ab" * 20,
        b"fed": b"f" * 32,
        b"name": b"clinic",
        b"dht": b"11190",
        b"xfer": b"11180",
        b"dicom": b"11112",
    }
    site = parse_service(props, ["10.0.0.5"], "f" * 32)
    assert site == DiscoveredSite(
        bytes.fromhex("ab" * 20), "clinic", "10.0.0.5", 11190, 11180, 11112
    )
    assert parse_service(props, ["10.0.0.5"], "e" * 32) is None  # another federation
    assert parse_service(props, [], "f" * 32) is None
    assert parse_service({**props, b"dht": b"x"}, ["10.0.0.5"], "f" * 32) is None
    assert parse_service({**props, b"id": b"zz"}, ["10.0.0.5"], "f" * 32) is None


async def test_two_members_find_each_other_on_loopback_and_ignore_others() -> None:
    ca, other = create_federation("disco"), create_federation("other")
    a, b = make_identity(ca, "disco-a"), make_identity(ca, "disco-b")
    c, d = make_identity(other, "other-c"), make_identity(other, "other-d")
    ports = {"dht_port": 1, "transfer_port": 2, "dicom_port": 3, "ae_title": "T"}
    sides = [
        Discovery(a, ca.federation, host="127.0.0.1", **ports),  # type: ignore[arg-type]
        Discovery(b, ca.federation, host="127.0.0.1", **ports),  # type: ignore[arg-type]
        Discovery(c, other.federation, host="127.0.0.1", **ports),  # type: ignore[arg-type]
        Discovery(d, other.federation, host="127.0.0.1", **ports),  # type: ignore[arg-type]
    ]
    try:
        await asyncio.gather(*(side.start() for side in sides))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(side.found() for side in sides):
                break
            await asyncio.sleep(0.1)
        assert [s.site_id for s in sides[0].found()] == [b.site_id]
        assert [s.site_id for s in sides[1].found()] == [a.site_id]
        # the other federation's sites, browsing the same service type, see only each other
        assert [s.site_id for s in sides[2].found()] == [d.site_id]
        assert [s.site_id for s in sides[3].found()] == [c.site_id]
        found = sides[0].found()[0]
        assert (found.name, found.host, found.dht_port, found.transfer_port) == (
            "disco-b",
            "127.0.0.1",
            1,
            2,
        )
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                await side.stop()


@pytest.mark.netns
def test_discovery_across_two_namespaces(tmp_path: Path) -> None:
    reason = netns_available()
    if reason is not None:
        pytest.skip(reason)
    names = ["ns-clinic-a", "ns-clinic-b"]
    procs: list[subprocess.Popen[str]] = []
    with Lan(len(names)) as lan:
        hosts = lan.hosts
        fed = create_federation_dir(tmp_path / "fed", "netns")
        sites = [
            enroll_site(fed, n, tmp_path / n, host=h) for n, h in zip(names, hosts, strict=True)
        ]
        try:
            _run_sides(lan, sites, names, hosts, procs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)


def _run_sides(
    lan: Lan,
    sites: list[Site],
    names: list[str],
    hosts: list[str],
    procs: list[subprocess.Popen[str]],
) -> None:
    """Each side announces and browses from its own namespace and reports what it found."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), str(HERE)])}
    for i in range(len(sites)):
        cmd = [
            *lan.prefix(i), sys.executable, str(HERE / "fed_discovery_side.py"),
            "--site", str(sites[i].path), "--host", hosts[i],
            "--expect", names[1 - i], "--timeout", "30",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    reports = []
    for p in procs:
        assert p.stdout is not None
        line = p.stdout.readline()  # bounded: each side prints by its own 30 s deadline
        assert line, f"side exited without a report: {p.communicate(timeout=10)[1][-2000:]}"
        reports.append(json.loads(line))
    for p in procs:
        p.communicate(input="", timeout=15)  # close stdin: they unregister and exit
        assert p.returncode == 0
    for i, report in enumerate(reports):
        assert report["site"] == names[i]
        other = 1 - i
        assert [s["name"] for s in report["found"]] == [names[other]], report
        assert report["found"][0]["host"] == hosts[other]
        assert report["found"][0]["xfer"] == 11180
