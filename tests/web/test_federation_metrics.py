"""Federation metrics from real site processes: members, transfer bytes per peer, repairs and
scrubs, as two sites replicate a study; and /status.json is the JSON of 'status --json'."""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pacs.control.client import RUNFILE
from p2pacs.dicom.scu import store_files
from p2pacs.testbed import SiteProcess, Testbed, free_port, wait_for

from web_helpers import TOKEN, enable_web

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(tmp_path / "fed", ["clinic-a", "clinic-b"], down_after=3.0) as bed:
        for site in bed.sites.values():
            enable_web(site.site, port=free_port(), token=TOKEN)
        bed.start()
        yield bed


def _get(site: SiteProcess, path: str) -> bytes:
    host, port = json.loads((site.path / RUNFILE).read_text())["web"]
    cfg = site.site.config.web
    ctx = ssl.create_default_context(cafile=str(site.path / cfg.tls_cert))
    request = urllib.request.Request(
        f"https://{host}:{port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, context=ctx, timeout=15) as r:
        return bytes(r.read())


def _scrape(site: SiteProcess) -> Samples:
    text = _get(site, "/metrics").decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_replication_shows_in_both_sites_metrics(pair: Testbed, web_instances: list[Path]) -> None:
    a, b = pair["clinic-a"], pair["clinic-b"]
    report = store_files(a.host, a.dicom_port, a.aet, web_instances)
    assert len(report.stored) == len(web_instances)
    n = len(web_instances)
    assert wait_for(lambda: b.status()["instances"] == n, 60, 0.3), "not replicated to b"
    sent_to_b = ("p2pacs_transfer_sent_bytes_total", (("peer", "clinic-b"),))
    # a labels bytes by the member's name once it has met b (before that, by b's site id)
    assert wait_for(lambda: sent_to_b in _scrape(a), 30, 0.3), "a never named b"
    at_a = _scrape(a)
    assert wait_for(
        lambda: _scrape(b)[("p2pacs_repairs_total", (("result", "done"),))] >= 1, 30, 0.3
    )
    at_b = _scrape(b)
    stored = a.status()["bytes"]
    sent = at_a[sent_to_b]
    received = at_b[("p2pacs_transfer_received_bytes_total", (("peer", "clinic-a"),))]
    assert 0 < received <= stored and 0 < sent <= stored
    dataset_bytes = at_a[("p2pacs_dicom_received_bytes_total", ())]
    assert received >= dataset_bytes  # every instance, plus manifests and catalogues
    assert at_a[("p2pacs_member_up", (("member", "clinic-b"),))] == 1
    assert at_a[("p2pacs_members", (("state", "up"),))] == 1
    assert at_a[("p2pacs_members", (("state", "down"),))] == 0
    assert at_b[("p2pacs_archive_instances", ())] == n
    under = ("p2pacs_under_replicated_studies", ())  # as of a's next anti-entropy pass
    assert wait_for(lambda: _scrape(a)[under] == 0, 30, 0.3)
    # a scrub is counted
    scrubbed = a.run_cli("scrub", timeout=120)
    assert scrubbed.returncode == 0, scrubbed.stderr.decode()
    after = _scrape(a)
    assert after[("p2pacs_scrub_runs_total", ())] == 1
    assert after[("p2pacs_scrub_checked_blobs_total", ())] >= n
    assert after[("p2pacs_scrub_corrupt_blobs_total", ())] == 0
    # the page's JSON is the command line's
    page = json.loads(_get(a, "/status.json"))
    cli = json.loads(a.run_cli("status", "--json").stdout)
    assert page["running"] is cli["running"] is True
    assert set(page) == set(cli)
    assert page["federation"]["scrub"]["runs"] == cli["federation"]["scrub"]["runs"] == 1


def test_page_follows_a_recovery(pair: Testbed, tmp_path: Path) -> None:
    """A wiped site's page shows its recovery running (progress bar, studies, ETA), then done;
    its metrics show the queue draining."""
    from p2pacs.samples import generate_instances

    a, b = pair["clinic-a"], pair["clinic-b"]
    files = generate_instances(
        tmp_path / "six", studies=6, series_per_study=1, instances_per_series=2,
        rows=32, columns=32, seed=11,
    )  # fmt: skip
    assert not store_files(a.host, a.dicom_port, a.aet, files).failed
    assert wait_for(lambda: b.status()["studies"] == 6, 60, 0.3), "not replicated to b"

    def a_knows_b_holds_them() -> bool:  # b's signed record names a catalogue of all six
        members = a.status()["federation"]["members"]
        return [m["studies"] for m in members if m["name"] == "clinic-b"] == [6]

    assert wait_for(a_knows_b_holds_them, 30, 0.3)
    b.kill()
    b.wipe()
    # each study takes a second (three at once): the recovery lasts long enough to be seen
    b.start(env={"P2PACS_FAILPOINTS": "recovery.study=delay:1.0"})

    def running() -> bool:
        page = _get(b, "/").decode()
        return "<progress" in page and "of 6 studies" in page and "ETA" in page

    assert wait_for(running, 30, 0.1), _get(b, "/").decode()
    pending = ("p2pacs_recovery_pending_studies", ())
    assert _scrape(b)[pending] > 0
    assert wait_for(lambda: _scrape(b)[pending] == 0, 60, 0.3)
    done = _scrape(b)
    assert done[("p2pacs_recovery_studies_done", ())] == 6
    assert done[("p2pacs_recovery_bytes_done", ())] == done[("p2pacs_recovery_bytes_planned", ())]
    assert done[("p2pacs_archive_instances", ())] == 12
    assert "6 of 6 studies" in _get(b, "/").decode()
