"""The OHIF viewer (its built web app from npm, ``@ohif/app``) in Debian's headless Chromium,
against a real site process: OHIF is served from another origin (a static server on loopback),
calls the site's DICOMweb root over HTTPS with a bearer token (so CORS preflights and the
token check both happen for real), lists the site's studies and renders a CT.

The tarball (~50 MB) is fetched once with ``npm pack`` into ``.cache/ohif/`` in the project
(git ignores it) and reused; the test is skipped, saying why, only if npm cannot fetch it.
Screenshots are saved in the test's folder."""

from __future__ import annotations

import functools
import io
import json
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest

from p2pacs.control.client import RUNFILE
from p2pacs.dicom.scu import store_files
from p2pacs.testbed import Testbed, free_port, wait_for

from web_helpers import TOKEN, enable_web, spki_pin

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
OHIF_VERSION = "3.12.10"  # the viewer release this test was written against
CACHE = Path(__file__).resolve().parents[2] / ".cache" / "ohif"
WAIT = 45.0  # seconds for the study list, then for the image, to show
MANY_COLOURS = 64  # a rendered CT has far more distinct colours than this; a blank one has 1

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("chromium") is None or shutil.which("chromedriver") is None,
        reason="Debian's chromium and chromium-driver are not installed (make debs)",
    ),
]


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    """OHIF's built ``dist/`` folder, from the npm tarball (fetched once, then cached)."""
    tarball = CACHE / f"ohif-app-{OHIF_VERSION}.tgz"
    dist = CACHE / f"app-{OHIF_VERSION}" / "package" / "dist"
    if (dist / "index.html").exists():
        return dist
    CACHE.mkdir(parents=True, exist_ok=True)
    if not tarball.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot fetch the OHIF viewer (@ohif/app)")
        done = subprocess.run(
            [npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", str(CACHE)],
            capture_output=True, timeout=600, check=False,
        )  # fmt: skip
        if done.returncode != 0 or not tarball.exists():
            pytest.skip(f"npm could not fetch @ohif/app@{OHIF_VERSION}: {done.stderr[-500:]!r}")
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later: refuse unsafe members
            tar.extractall(dist.parents[1], filter="data")
        else:  # Debian 12's 3.11.2: no filter; the names are npm's own package layout
            for member in tar.getmembers():
                if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                    raise RuntimeError(f"unsafe path in {tarball.name}: {member.name}")
            tar.extractall(dist.parents[1])
    return dist


def app_config(root: str, token: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, the site's root.

    OHIF 3.12's DICOMweb data source takes its ``Authorization`` header only from its user
    authentication service (OIDC login, or a ``?token=`` in the page URL, which would leak the
    token into history and logs); the data source's ``requestOptions.auth`` is not read by it.
    So this deployment's config adds the header itself, to requests for the site's root only."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "p2pacs",
        "configuration": {
            "friendlyName": "p2pacs site",
            "name": "p2pacs",
            "qidoRoot": root,
            "wadoRoot": root,
            "wadoUriRoot": root,
            "qidoSupportsIncludeField": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "",
            "bulkDataURI": {"enabled": False},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "p2pacs",
        "dataSources": [source],
    }
    # OHIF 3.12 bundles onnxruntime-web (its segmentation tools), whose Emscripten loader reads
    # `document.currentScript || __filename` when first required. Required after its chunk has
    # run (as on a busy machine), `__filename`, a Node.js name, is undefined in a browser: the
    # ReferenceError stopped the whole viewer route (a black page: one CI run, and 2 of 25 runs
    # beside busy CPU loops here; 0 of 20 with this). A global `__filename` makes that fallback
    # harmless; nothing here uses onnxruntime.
    return f"""window.config = {json.dumps(config)};
var __filename = "";
(function () {{
  var ROOT = {json.dumps(root)}, AUTH = {json.dumps("Bearer " + token)};
  function ours(url) {{ return String(url).indexOf(ROOT) === 0; }}
  var open = XMLHttpRequest.prototype.open, send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function (method, url) {{
    this.p2pacsAuth = ours(url);
    return open.apply(this, arguments);
  }};
  XMLHttpRequest.prototype.send = function () {{
    if (this.p2pacsAuth) this.setRequestHeader("Authorization", AUTH);
    return send.apply(this, arguments);
  }};
  var fetch0 = window.fetch;
  window.fetch = function (input, init) {{
    var url = typeof input === "string" ? input : (input && input.url);
    if (ours(url)) {{
      init = Object.assign({{}}, init || {{}});
      var headers = new Headers(init.headers || (input instanceof Request ? input.headers : {{}}));
      headers.set("Authorization", AUTH);
      init.headers = headers;
    }}
    return fetch0.call(this, input, init);
  }};
}})();
"""


class _Handler(SimpleHTTPRequestHandler):
    """OHIF's files; any path that is not a file is the single-page app's index.html."""

    config_js = b""
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm"}

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(self.config_js)))
            self.end_headers()
            self.wfile.write(self.config_js)
            return
        if not (Path(self.directory) / path.lstrip("/")).is_file():
            self.path = "/index.html"
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def viewer_port() -> int:
    return free_port()


@pytest.fixture
def site(
    tmp_path: Path, pydicom_all_files: list[Path], viewer_port: int
) -> Iterator[tuple[str, Path, Path]]:
    """A site process holding pydicom's CT_small.dcm, letting the viewer's origin call it:
    (DICOMweb root, the web server's certificate, the CT file)."""
    ct = next(p for p in pydicom_all_files if p.name == "CT_small.dcm")
    with Testbed(tmp_path / "fed", ["viewer-site"], replication=1) as bed:
        node = bed["viewer-site"]
        config = node.site
        cert, _ = enable_web(config, token=TOKEN)
        config.config.web.cors_origins = [f"http://127.0.0.1:{viewer_port}"]
        config.save_config()
        bed.start()
        report = store_files("127.0.0.1", node.dicom_port, node.aet, [ct])
        assert not report.failed
        host, port = json.loads((node.path / RUNFILE).read_text())["web"]
        yield f"https://{host}:{port}/dicomweb", cert, ct


@pytest.fixture
def viewer(ohif_dist: Path, site: tuple[str, Path, Path], viewer_port: int) -> Iterator[str]:
    """OHIF's files on the viewer's own origin (loopback, plain HTTP)."""
    root, _, _ = site
    handler_class = type("Handler", (_Handler,), {"config_js": app_config(root, TOKEN).encode()})
    handler = functools.partial(handler_class, directory=str(ohif_dist))
    server = ThreadingHTTPServer(("127.0.0.1", viewer_port), handler)
    thread = threading.Thread(target=server.serve_forever, name="ohif-static", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{viewer_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def chromium(tmp_path: Path, site: tuple[str, Path, Path]) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    _, cert, _ = site
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--window-size=1400,900",
        "--use-angle=swiftshader",  # WebGL in software: there is no GPU here
        "--enable-unsafe-swiftshader",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--ignore-certificate-errors-spki-list={spki_pin(cert)}",  # the site's, nothing else
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _canvas_colours(driver: Any) -> int:
    """Distinct colours (up to MANY_COLOURS + 1) in a screenshot of the largest viewport canvas
    (0: none yet)."""
    from PIL import Image
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:  # OHIF replaces its canvases while it lays the viewport out
        canvases = [
            c
            for c in driver.find_elements(By.CSS_SELECTOR, "canvas.cornerstone-canvas")
            if c.size["width"] > 100
        ]
        if not canvases:
            return 0
        largest = max(canvases, key=lambda c: c.size["width"] * c.size["height"])
        png = largest.screenshot_as_png
    except StaleElementReferenceException:
        return 0
    colours = Image.open(io.BytesIO(png)).convert("RGB").getcolors(MANY_COLOURS)
    return MANY_COLOURS + 1 if colours is None else len(colours)


def test_ohif_lists_and_renders_a_ct_from_the_site(
    viewer: str, chromium: Any, site: tuple[str, Path, Path], tmp_path: Path
) -> None:
    _, _, ct = site
    header = pydicom.dcmread(ct, stop_before_pixels=True)
    driver = chromium
    driver.get(f"{viewer}/")
    # the study list: OHIF's QIDO-RS search, through a CORS preflight and the token check
    shown = wait_for(lambda: str(header.PatientID) in driver.page_source, WAIT, 0.5)
    driver.save_screenshot(str(tmp_path / "ohif-study-list.png"))
    assert shown, _browser_log(driver)
    # the viewer: series metadata and the CT's frame by WADO-RS, drawn on a canvas
    driver.get(f"{viewer}/viewer?StudyInstanceUIDs={header.StudyInstanceUID}")
    drawn = wait_for(lambda: _canvas_colours(driver) > MANY_COLOURS, WAIT, 1.0)
    driver.save_screenshot(str(tmp_path / "ohif-viewer.png"))
    assert drawn, _browser_log(driver)


def _browser_log(driver: Any) -> str:
    try:
        entries = driver.get_log("browser")
    except Exception as exc:  # the log is a help for the failure message only
        return f"(no browser log: {exc})"
    return "\n".join(str(e.get("message", ""))[:300] for e in entries[-30:])
