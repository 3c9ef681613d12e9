"""The status page: server-rendered HTML from the status snapshot, readable on a phone.

Pure functions (status dict in, HTML text out; every value escaped). No build chain: one
inline stylesheet and a dozen lines of plain JavaScript that fetch the page again every
``refresh`` seconds and swap its ``<main>``; when the site stops answering, the old content
stays and a banner says since when it has not answered.
"""

from __future__ import annotations

import base64
import hashlib
import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

from p2pacs.web.recent import Failure
from p2pacs.web.view import ago, duration, size, status_warnings

__all__ = ["eta_seconds", "page_headers", "render_page"]

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:0 .8rem 2rem;color:#222;background:#fafafa}
h1{font-size:1.3rem;margin:.8rem 0 .2rem}h2{font-size:1.05rem;margin:1.2rem 0 .4rem}
.sub{color:#666;font-size:.9rem}.cards{display:flex;flex-wrap:wrap;gap:.5rem}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4rem .7rem;min-width:7rem}
.card b{display:block;font-size:1.2rem}table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.3rem .4rem;border-bottom:1px solid #eee;font-size:.9rem}
.wrap{overflow-x:auto}.state{font-weight:bold;border-radius:4px;padding:0 .3rem}
.up{color:#fff;background:#2e7d32}.suspect{color:#000;background:#fbc02d}
.down{color:#fff;background:#c62828}.self{color:#fff;background:#1565c0}
.warn{background:#fff3e0;border-left:4px solid #ef6c00;padding:.4rem .6rem;margin:.3rem 0}
.bad{color:#c62828}progress{width:100%;height:1.1rem}#stale{background:#c62828;color:#fff;
padding:.4rem .6rem;position:sticky;top:0}
"""

SCRIPT = """
const every = %d;
let failingSince = null;
async function tick() {
  try {
    const r = await fetch(location.pathname, {cache: "no-store", credentials: "same-origin"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    document.getElementById("main").replaceWith(doc.getElementById("main"));
    document.getElementById("stale").hidden = true;
    failingSince = null;
  } catch (e) {
    failingSince = failingSince || new Date();
    const s = document.getElementById("stale");
    s.textContent = "this site has not answered since " + failingSince.toLocaleTimeString() +
      " (" + e.message + "); what is shown is older; retrying";
    s.hidden = false;
  }
  setTimeout(tick, every);
}
setTimeout(tick, every);
"""


def _script(refresh: float) -> str:
    return SCRIPT % int(refresh * 1000)


def page_headers(refresh: float) -> dict[str, str]:
    """Response headers of the page: nothing but its own inline script and style may run (a
    value that slipped past escaping still could not), no framing, no caching."""
    digest = hashlib.sha256(_script(refresh).encode()).digest()
    script = "'sha256-" + base64.b64encode(digest).decode() + "'"
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {script}; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def eta_seconds(recovery: Mapping[str, Any], now: float) -> float | None:
    """Seconds until the running recovery is done, at its average rate so far (None: unknown)."""
    done = float(recovery.get("bytes_done") or 0)
    total = float(recovery.get("bytes_total") or 0)
    started = float(recovery.get("started") or 0)
    if not started or done <= 0 or total <= done or now <= started:
        return None
    rate = done / (now - started)
    return (total - done) / rate


def _card(label: str, value: object) -> str:
    return f'<div class="card">{_e(label)}<b>{_e(value)}</b></div>'


def _state(state: str) -> str:
    return f'<span class="state {_e(state)}">{_e(state)}</span>'


def _members(status: Mapping[str, Any], fed: Mapping[str, Any]) -> str:
    rows = [
        f"<tr><td>{_e(status['site'])}</td><td>{_state('self')} this site</td><td>-</td>"
        f"<td>{_e(status.get('studies', 0))}</td><td>-</td></tr>"
    ]
    for m in fed.get("members") or []:
        state = m.get("state") or ("up" if m.get("up") else "down")
        rows.append(
            f'<tr class="member" data-name="{_e(m["name"])}" data-state="{_e(state)}">'
            f"<td>{_e(m['name'])}</td><td>{_state(state)}</td>"
            f"<td>{_e(ago(m.get('last_seen_s')))}</td><td>{_e(m.get('studies', 0))}</td>"
            f"<td>{_e(m.get('address', ''))}</td></tr>"
        )
    return (
        '<h2>Sites</h2><div class="wrap"><table id="members"><tr><th>site</th><th>state</th>'
        "<th>last seen</th><th>studies</th><th>address</th></tr>" + "".join(rows) + "</table></div>"
    )


def _recovery(fed: Mapping[str, Any], now: float) -> str:
    rec = fed.get("recovery") or {}
    pending = fed.get("recovery_pending") or 0
    if not pending and not rec.get("studies_total") and not rec.get("awaiting_record"):
        return "<h2>Recovery</h2><p>none running</p>"
    total, done = rec.get("bytes_total") or 0, rec.get("bytes_done") or 0
    eta = eta_seconds(rec, now)
    parts = [
        '<h2>Recovery</h2><div id="recovery">',
        f'<progress max="{max(total, 1)}" value="{min(done, total)}"></progress>',
        f"<p>{_e(rec.get('studies_done', 0))} of {_e(rec.get('studies_total', 0))} studies, "
        f"{_e(size(done))} of {_e(size(total))}; "
        f"{_e(pending)} still queued; ETA {_e(duration(eta) if eta is not None else 'unknown')}"
        f"{'; retrying ' + _e(rec['retrying']) if rec.get('retrying') else ''}</p>",
    ]
    if rec.get("awaiting_record"):
        parts.append(f"<p>awaiting its last site record: {_e(rec.get('error') or 'looking')}</p>")
    parts.append("</div>")
    return "".join(parts)


def _repairs(fed: Mapping[str, Any], now: float) -> str:
    rows = [
        f"<tr><td>{_e(ago(now - r['time']))}</td>"
        f"<td>{'done' if r.get('ok') else '<span class=bad>failed</span>'}</td>"
        f"<td>{_e(r.get('study', ''))}</td><td>{_e(r.get('detail', ''))}</td></tr>"
        for r in fed.get("recent_repairs") or []
    ]
    table = (
        '<div class="wrap"><table id="repairs"><tr><th>when</th><th>result</th><th>study</th>'
        "<th>detail</th></tr>" + "".join(rows) + "</table></div>"
        if rows
        else "<p>no repair pulls yet</p>"
    )
    under = _e(fed.get("under_replicated", 0))
    return (
        f"<h2>Repairs</h2><p>under-replicated studies: <b id=under>{under}"
        f"</b>; queued {_e(fed.get('repair_queue', 0))}; done {_e(fed.get('pulls_done', 0))}, "
        f"failed {_e(fed.get('pulls_failed', 0))}</p>" + table
    )


def _failures(failures: Sequence[Failure], now: float) -> str:
    if not failures:
        return "<h2>Recent failures</h2><p>none since the site started</p>"
    rows = "".join(
        f"<tr><td>{_e(ago(now - f.time))}</td><td>{_e(f.what)}</td><td>{_e(f.who)}</td>"
        f"<td>{_e(f.detail)}</td></tr>"
        for f in failures
    )
    return (
        '<h2>Recent failures</h2><div class="wrap"><table id="failures"><tr><th>when</th>'
        f"<th>what</th><th>who</th><th>detail</th></tr>{rows}</table></div>"
    )


def _storage(status: Mapping[str, Any]) -> str:
    st = status.get("storage") or {}
    cards = [_card("stored", size(status.get("bytes", 0)))]
    if st.get("map_size"):
        cards.append(_card("LMDB map used", f"{100 * st['used_bytes'] / st['map_size']:.1f} %"))
    if st.get("disk_total"):
        cards.append(_card("disk free", f"{size(st['disk_free'])} of {size(st['disk_total'])}"))
    return '<h2>Storage</h2><div class="cards">' + "".join(cards) + "</div>"


def render_page(
    status: Mapping[str, Any],
    *,
    failures: Sequence[Failure] = (),
    refresh: float = 5.0,
    now: float | None = None,
) -> str:
    """The whole page for one status snapshot (``SiteNode.status()``)."""
    now = time.time() if now is None else now
    fed = status.get("federation") or {}
    warnings = status_warnings(dict(status), [])
    dicom = status.get("dicom") or ["", ""]
    head = (
        f"<h1>{_e(status['site'])}</h1><p class=sub>p2pacs {_e(status.get('version', ''))}, "
        f"up {_e(duration(status.get('uptime_s', 0)))}; DICOM {_e(status.get('ae_title', ''))} "
        f"port {_e(dicom[1])}; shown {_e(time.strftime('%H:%M:%S', time.localtime(now)))}</p>"
    )
    cards = [
        _card("studies", status.get("studies", 0)),
        _card("instances", status.get("instances", 0)),
        _card("patients", status.get("patients", 0)),
    ]
    if fed:
        cards += [
            _card("sites up", fed.get("sites_up", 1)),
            _card("sites down", fed.get("sites_down", 0)),
            _card("under-replicated", fed.get("under_replicated", 0)),
        ]
    body = [head, '<div class="cards">' + "".join(cards) + "</div>"]
    body += [f'<div class="warn">{_e(w)}</div>' for w in warnings]
    if fed:
        body += [_members(status, fed), _recovery(fed, now), _repairs(fed, now)]
    else:
        body.append("<p>standalone site: not enrolled in a federation</p>")
    body += [_failures(failures, now), _storage(status)]
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(status['site'])} - p2pacs</title><style>{STYLE}</style></head><body>"
        '<div id="stale" hidden></div><main id="main">'
        + "".join(body)
        + f"</main><script>{_script(refresh)}</script></body></html>"
    )
