"""The web server of a running site (in-process, real HTTPS on loopback): access control,
TLS, the status page, /status.json, /metrics after real C-STOREs, and the [web] settings
from the command line."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from p2pacs.cli import main
from p2pacs.cli.serve_cmds import ports_taken_message
from p2pacs.config import WebConfig
from p2pacs.control.client import RUNFILE
from p2pacs.dicom.scu import store_files
from p2pacs.errors import WebError
from p2pacs.events import Event, SecurityAlert, UserAuthentication
from p2pacs.node import SiteNode
from p2pacs.site import Site
from p2pacs.web import WebServer
from p2pacs.web.auth import PRINCIPAL

from web_helpers import PASSWORD, TOKEN, USER, enable_web


def _tls(node: SiteNode) -> ssl.SSLContext:
    """Trusts exactly the site's test certificate."""
    return ssl.create_default_context(cafile=str(node.site.path / node.site.config.web.tls_cert))


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


class Alerts:
    def __init__(self) -> None:
        self.items: list[SecurityAlert] = []
        self.logins: list[UserAuthentication] = []
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, SecurityAlert):
                self.items.append(event)
            elif isinstance(event, UserAuthentication):
                self.logins.append(event)


async def test_refused_without_valid_credentials(web_node: SiteNode) -> None:
    assert web_node.web is not None
    alerts = Alerts()
    assert web_node.archive is not None
    web_node.archive.events.subscribe(alerts)
    url = web_node.web.url
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_tls(web_node))) as s:
        for path in ("/", "/metrics", "/status.json", "/no-such-page"):
            async with s.get(url + path) as r:
                assert r.status == 401, path
                challenges = r.headers.getall("WWW-Authenticate")
                assert 'Basic realm="p2pacs", charset="UTF-8"' in challenges
                assert 'Bearer realm="p2pacs"' in challenges
                assert "instances" not in await r.text()
        for headers in (
            _basic(USER, PASSWORD + "x"),
            _basic("mallory", PASSWORD),
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Basic %%%"},
        ):
            async with s.get(url + "/status.json", headers=headers) as r:
                assert r.status == 401
        async with s.get(url + "/status.json", headers=_basic(USER, PASSWORD)) as r:
            assert r.status == 200
            status = await r.json()
        async with s.get(url + "/", headers=_basic(USER, PASSWORD)) as r:
            assert r.status == 200  # the same user again: one login, not one per request
        async with s.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert [a.kind for a in alerts.items] == ["auth-failed"] * 8
    details = [a.detail for a in alerts.items]
    assert details[0] == "web GET /: no credentials"
    assert "wrong password for user 'oncall'" in details[4]
    assert "unknown user 'mallory'" in details[5]
    assert "unknown bearer token" in details[6]
    assert all(a.peer == "127.0.0.1" for a in alerts.items)
    # PS3.15 User Authentication: the named user's failed and successful logins, and the token
    assert [(e.user, e.success) for e in alerts.logins] == [
        (f"user:{USER}", False),
        ("user:mallory", False),
        (f"user:{USER}", True),
        ("token:prometheus", True),
    ]
    assert status["running"] is True and status["schema"] == 1
    assert status["web"] == list(web_node.web.address)


async def test_https_only_and_the_certificate_is_checked(web_node: SiteNode) -> None:
    assert web_node.web is not None
    host, port = web_node.web.address
    assert web_node.web.url == f"https://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to the HTTPS port
            async with s.get(f"http://{host}:{port}/", headers=_basic(USER, PASSWORD)) as r:
                await r.read()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):  # not a public CA's
            async with s.get(f"https://{host}:{port}/", headers=_basic(USER, PASSWORD)) as r:
                await r.read()
        async with s.get(
            f"https://{host}:{port}/", headers=_basic(USER, PASSWORD), ssl=_tls(web_node)
        ) as r:
            assert r.status == 200
            assert "text/html" in r.headers["Content-Type"]
            assert "script-src 'sha256-" in r.headers["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            page = await r.text()
    assert '<meta name="viewport"' in page and "standalone site" in page
    runfile = json.loads((web_node.site.path / RUNFILE).read_text())
    assert runfile["web"] == [host, port]


async def test_metrics_count_what_was_stored(web_node: SiteNode, web_instances: list[Path]) -> None:
    assert web_node.gateway is not None and web_node.web is not None
    host, port = web_node.dicom_address
    report = await asyncio.to_thread(
        store_files, host, port, web_node.site.config.dicom.ae_title, web_instances
    )
    assert len(report.stored) == len(web_instances) and not report.failed
    expected_bytes = 0
    for path in web_instances:
        expected_bytes += len(path.read_bytes())
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_tls(web_node))) as s,
        s.get(web_node.web.url + "/metrics", headers=headers) as r,
    ):
        text = await r.text()
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    n = len(web_instances)
    assert float(lines["p2pacs_archive_instances"]) == n
    assert float(lines["p2pacs_archive_studies"]) == 1
    key = 'p2pacs_dicom_requests_total{service="C-STORE",status_class="success"}'
    assert float(lines[key]) == n
    assert 'p2pacs_dicom_request_duration_seconds_count{service="C-STORE"}' in lines
    received = float(lines["p2pacs_dicom_received_bytes_total"])
    assert 0 < received < expected_bytes  # datasets, without the files' meta and preamble
    assert float(lines["p2pacs_dicom_associations_open"]) == 0
    assert float(lines["p2pacs_dicom_associations_total"]) >= 1
    assert float(lines["p2pacs_storage_disk_size_bytes"]) > 0


async def test_plain_http_on_loopback(tmp_path: Path) -> None:
    site = Site.init(tmp_path / "s")
    site.config.dicom.port = 0
    site.config.dicom.workers = 1  # the in-process gateway
    enable_web(site)
    web = site.config.web
    web.tls_cert = web.tls_key = ""
    web.plain_http = True
    async with SiteNode(site) as node:
        assert node.web is not None and node.web.url.startswith("http://127.0.0.1:")
        async with (
            aiohttp.ClientSession() as s,
            s.get(node.web.url + "/", headers=_basic(USER, PASSWORD)) as r,
        ):
            assert r.status == 200


async def test_plain_http_refused_off_loopback_and_taken_port(tmp_path: Path) -> None:
    from p2pacs.events import EventBus

    config = WebConfig(enabled=True, bind="0.0.0.0", plain_http=True, users={"a": "x"})
    with pytest.raises(WebError, match="loopback"):
        await WebServer(config, EventBus(), base=tmp_path).start()
    site = Site.init(tmp_path / "s")
    site.config.dicom.port = 0
    site.config.dicom.workers = 1  # the in-process gateway
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        enable_web(site, port=taken.getsockname()[1])
        message = ports_taken_message(site)  # what 'serve' says before it starts anything
        assert message is not None and "config set web.port N" in message
        node = SiteNode(site)
        with pytest.raises(WebError, match=r"web\.port"):
            async with node:
                pass
        assert node.gateway is None and node.archive is None  # everything stopped again


def test_web_settings_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = str(tmp_path / "s")
    assert main(["--site", folder, "init"]) == 0
    assert main(["--site", folder, "config", "set", "web.enabled", "true"]) == 2
    assert "web user or token" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("pw one\n"))
    assert main(["--site", folder, "web", "user", "add", "alice", "--password-stdin"]) == 0
    assert main(["--site", folder, "web", "token", "add", "prometheus"]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["--site", folder, "config", "set", "web.plain_http", "true"]) == 0
    assert main(["--site", folder, "config", "set", "web.enabled", "true"]) == 0
    assert main(["--site", folder, "config", "set", "web.bind", "0.0.0.0"]) == 2
    text = (tmp_path / "s" / "site.toml").read_text()
    assert "pw one" not in text and token not in text and "scrypt$" in text
    web = Site.open(tmp_path / "s").config.web
    assert web.enabled and web.bind == "127.0.0.1"
    from p2pacs import credentials

    assert credentials.verify_password(web.users["alice"], "pw one")
    assert credentials.verify_token(web.tokens["prometheus"], token)
    assert main(["--site", folder, "web", "user", "remove", "alice"]) == 0
    assert main(["--site", folder, "web", "token", "remove", "prometheus"]) == 2  # the last one
    assert "web user or token" in capsys.readouterr().err


async def test_more_route_sets_mount_behind_the_same_access_control(tmp_path: Path) -> None:
    """How DICOMweb (or any later route set) joins: ``SiteNode.web_parts``, then ``add_app``
    or ``add_routes`` before the server starts; never after."""
    site = Site.init(tmp_path / "s")
    site.config.dicom.port = 0
    site.config.dicom.workers = 1  # the in-process gateway
    enable_web(site, token=TOKEN)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hello {request[PRINCIPAL]}")

    def mount(server: WebServer) -> None:
        extra = web.Application()
        extra.router.add_get("/hello", hello)
        server.add_app("/extra", extra)
        server.add_routes(lambda app: app.router.add_get("/also", hello))

    node = SiteNode(site)
    node.web_parts.append(mount)
    async with node:
        assert node.web is not None
        url = node.web.url
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=_tls(node))) as s:
            for path in ("/extra/hello", "/also"):
                async with s.get(url + path) as r:
                    assert r.status == 401
                async with s.get(url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as r:
                    assert r.status == 200
                    assert await r.text() == "hello token:prometheus"
        with pytest.raises(WebError, match="before the web server starts"):
            node.web.add_app("/late", web.Application())
