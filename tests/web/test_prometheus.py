"""A real Prometheus (Debian's package) scrapes a running site over HTTPS with a bearer token;
PromQL through its HTTP API returns the number of instances just stored. promtool checks the
metric names against Prometheus's conventions, and checks and unit-tests the shipped alert
rules (deploy/prometheus-alerts.yml)."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from p2pacs.dicom.scu import store_files
from p2pacs.node import SiteNode
from p2pacs.testbed import free_port

from web_helpers import TOKEN

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus-alerts.yml"
ALERT_TESTS = Path(__file__).with_name("prometheus_alerts_test.yml")
READY_TIMEOUT = 30.0  # seconds for Prometheus to start answering
SCRAPE_TIMEOUT = 30.0  # seconds for a stored count to show in a query (1 s scrape interval)

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian's prometheus package is not installed (make debs)",
)


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.load(r)


@contextmanager
def running_prometheus(tmp: Path, target: tuple[str, int], ca_file: Path) -> Iterator[str]:
    """Prometheus scraping ``target`` every second; yields its API base URL."""
    token_file = tmp / "token"
    token_file.write_text(TOKEN)
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {
                        "job_name": "p2pacs",
                        "scheme": "https",
                        "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
                        "tls_config": {"ca_file": str(ca_file)},
                        "static_configs": [{"targets": [f"{target[0]}:{target[1]}"]}],
                    }
                ],
            }
        )
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    answer = _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


async def _wait_value(base: str, promql: str, expected: float) -> None:
    """Poll the query until it returns ``expected`` (bounded: SCRAPE_TIMEOUT)."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    seen: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        seen = await asyncio.to_thread(_query, base, promql)
        if seen and float(seen[0]["value"][1]) == expected:
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"{promql}: expected {expected}, last answer {seen}")


async def test_prometheus_scrapes_what_was_stored(
    web_node: SiteNode, web_instances: list[Path], tmp_path: Path
) -> None:
    assert web_node.web is not None
    site = web_node.site
    ca = site.path / site.config.web.tls_cert
    with running_prometheus(tmp_path, web_node.web.address, ca) as base:
        await _wait_value(base, 'up{job="p2pacs"}', 1)
        await _wait_value(base, "p2pacs_archive_instances", 0)
        host, port = web_node.dicom_address
        report = await asyncio.to_thread(
            store_files, host, port, site.config.dicom.ae_title, web_instances
        )
        assert len(report.stored) == len(web_instances)
        n = len(web_instances)
        await _wait_value(base, "p2pacs_archive_instances", n)
        await _wait_value(
            base, 'p2pacs_dicom_requests_total{service="C-STORE",status_class="success"}', n
        )
        await _wait_value(base, "p2pacs_archive_studies", 1)
        rules = await asyncio.to_thread(_get_json, f"{base}/api/v1/rules")
        names = {r["name"] for g in rules["data"]["groups"] for r in g["rules"]}
        assert {"P2pacsMemberDown", "P2pacsUnderReplicated", "P2pacsRecoveryStalled"} <= names
        assert "P2pacsScrubFoundCorruption" in names
        # no series carries a UID or patient attribute: every label value from the site
        series = await asyncio.to_thread(
            _get_json,
            f"{base}/api/v1/series?" + urllib.parse.urlencode({"match[]": '{job="p2pacs"}'}),
        )
        for labels in series["data"]:
            for value in labels.values():
                assert value.count(".") < 3 or value.startswith("127.0.0.1"), labels


async def test_metric_names_pass_promtool(web_node: SiteNode, web_instances: list[Path]) -> None:
    assert web_node.web is not None
    host, port = web_node.dicom_address
    site = web_node.site
    await asyncio.to_thread(store_files, host, port, site.config.dicom.ae_title, web_instances[:2])
    ca = site.path / site.config.web.tls_cert
    ctx = ssl.create_default_context(cafile=str(ca))
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s,
        s.get(web_node.web.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r,
    ):
        text = await r.read()
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert b"p2pacs_dicom_requests_total" in text


def test_alert_rules_pass_promtool() -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, timeout=30, check=False
    )
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert b"SUCCESS: 8 rules found" in checked.stdout
    tested = subprocess.run(
        ["promtool", "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout.decode() + tested.stderr.decode()
