"""Status for people, in the terminal (``p2pacs status``) and the browser: the JSON's own field
names, human times, whole addresses.

Pure functions from the status JSON (schema ``STATUS_SCHEMA``, documented field by field in
docs/operations.md) to lines and table rows, so the human and the JSON output say the same
words: a line reads ``sites_up 3`` where the JSON has ``"sites_up": 3``.
"""

from __future__ import annotations

import socket
from typing import Any

from p2pacs.const import STATUS_SCHEMA

__all__ = [
    "STATUS_SCHEMA",
    "ago",
    "duration",
    "member_rows",
    "reachable_host",
    "size",
    "status_lines",
    "status_warnings",
]

DROP_PREFIX = "dropped_"  # DHT counters of datagrams dropped before parsing (bad MAC, stale...)


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``5.2 h``, ``3.1 days``."""
    s = max(0.0, seconds)
    if s < 600:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def ago(seconds: float | None) -> str:
    return "never" if seconds is None else f"{duration(seconds)} ago"


def reachable_host(host: str, site_host: str | None) -> str:
    """A wildcard bind address (``0.0.0.0``, ``::``) as the host others reach: the site's
    ``federation.host`` when enrolled, else this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        return site_host or socket.gethostname()
    return host


def _kv(pairs: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{k} {v}" for k, v in pairs)


def status_lines(status: dict[str, Any], site_host: str | None, now: float) -> list[str]:
    """The human lines of ``status``, each field under its JSON name (rich markup)."""
    lines = []
    state = "[green]running[/]" if status.get("running") else "[red]not running[/]"
    pid = f" (pid {status['pid']})" if status.get("pid") else ""
    uptime = f", uptime_s {duration(status['uptime_s'])}" if "uptime_s" in status else ""
    lines.append(f"[bold]{status['site']}[/] {state}{pid}{uptime}")
    if status.get("dicom"):
        host, port = status["dicom"]
        lines.append(
            f"  dicom {status.get('ae_title', '')} at {reachable_host(str(host), site_host)}:{port}"
        )
    lines.append(
        "  "
        + _kv(
            [
                ("patients", status.get("patients", 0)),
                ("studies", status["studies"]),
                ("instances", status["instances"]),
                ("blobs", status["blobs"]),
                ("bytes", size(status["bytes"])),
            ]
        )
    )
    obj = status.get("object_store")
    if obj:
        state = "[green]reachable[/]" if obj.get("reachable") else "[red]unreachable[/]"
        lines.append(
            f"  object_store {obj['endpoint']} bucket {obj['bucket']}: {state} since "
            f"{ago(now - obj['since'])}"
            + (f" ({obj['last_error']})" if obj.get("last_error") else "")
        )
    fed = status.get("federation")
    if not fed:
        return lines
    members = fed.get("members", [])
    lines.append(
        "  federation: "
        + _kv(
            [
                ("sites_up", f"{fed['sites_up']} (this site + {fed['sites_up'] - 1} members)"),
                ("sites_down", fed["sites_down"]),
                ("replication", fed["replication"]),
                ("under_replicated", fed["under_replicated"]),
            ]
        )
        + ("" if members else " (no member known yet)")
    )
    last = fed.get("last_repair")
    lines.append(
        "  repair: "
        + _kv(
            [
                ("repair_passes", fed["repair_passes"]),
                ("last_repair", ago(now - last) if last else "never"),
                ("pulls_done", fed["pulls_done"]),
                ("pulls_failed", fed["pulls_failed"]),
                ("trimmed", fed.get("trimmed", 0)),
            ]
        )
        + (f", [red]repair_paused[/] {fed['repair_paused']}" if fed.get("repair_paused") else "")
    )
    rec = fed["recovery"]
    if fed["recovery_pending"] or rec.get("studies_total"):
        lines.append(
            "  recovery: "
            + _kv(
                [
                    ("recovery_pending", fed["recovery_pending"]),
                    ("studies_done", f"{rec['studies_done']} of {rec['studies_total']}"),
                    ("bytes_done", f"{size(rec['bytes_done'])} of {size(rec['bytes_total'])}"),
                    ("retrying", rec["retrying"]),
                ]
            )
        )
    else:
        lines.append("  recovery: recovery_pending 0")
    clock = fed.get("clock") or {}
    if clock.get("offset_s") is not None:
        off = "[red]off[/]" if clock.get("off") else "ok"
        lines.append(
            f"  clock: offset_s {clock['offset_s']:+.1f} ({clock.get('members', 0)} members), {off}"
        )
    drops = {k: v for k, v in (fed.get("dht") or {}).items() if k.startswith(DROP_PREFIX) and v}
    if drops:
        lines.append("  dht: " + _kv(sorted(drops.items())))
    if fed.get("corrupt_served") or fed.get("corrupt_repaired"):
        lines.append(
            "  "
            + _kv(
                [
                    ("corrupt_served", fed.get("corrupt_served", 0)),
                    ("corrupt_repaired", fed.get("corrupt_repaired", 0)),
                ]
            )
        )
    return lines


def status_warnings(status: dict[str, Any], bootstrap: list[str]) -> list[str]:
    """Doctor-class problems visible in the status alone (``p2pacs doctor`` says more)."""
    out = []
    obj = status.get("object_store")
    if obj and not obj.get("reachable"):
        out.append(
            f"object store unreachable ({obj.get('last_error')}): C-STORE answers 0xA700 until "
            f"{obj['endpoint']} bucket {obj['bucket']} answers again; ingest then resumes"
        )
    fed = status.get("federation")
    if not fed:
        return out
    clock = fed.get("clock") or {}
    if clock.get("off"):
        out.append(
            f"clock off: the members' clocks differ from this one by {clock['offset_s']:+.0f} s "
            "(beyond the DHT's 30 s window): check NTP"
        )
    dht = fed.get("dht") or {}
    if dht.get("dropped_bad_mac"):
        out.append(
            f"dht dropped_bad_mac {dht['dropped_bad_mac']}: something outside this federation "
            "sends to the DHT port (a site in another federation, or with a wrong secret?)"
        )
    if dht.get("dropped_stale"):
        out.append(f"dht dropped_stale {dht['dropped_stale']}: a sender's clock is off (NTP?)")
    members = fed.get("members") or []
    if not members and bootstrap:
        out.append(
            "no member known: the bootstrap sites have not answered as members of this "
            "federation (unreachable, or another federation or secret?)"
        )
    elif members and not any(m.get("up") for m in members):
        out.append("every member is down: no study can be replicated now")
    rec = fed.get("recovery") or {}
    if rec.get("awaiting_record"):
        out.append(
            "awaiting its last site record: this archive was wiped; it publishes no catalogue "
            f"until a member answers ({rec.get('error') or 'looking'})"
        )
    if rec.get("full"):
        out.append(f"recovery full: {rec['full']}")
    for uid, why in (rec.get("given_up") or {}).items():
        out.append(f"not recovered {uid}: {why}")
    return out


def member_rows(
    status: dict[str, Any], own_address: str | None, now: float
) -> list[tuple[str, str, str, str, str, str]]:
    """(site, state, last seen, address, studies, site id) for this site, then each member."""
    fed = status["federation"]
    rows = [
        (
            status["site"],
            "[green]this site[/]",
            "-",
            own_address or "",
            str(status["studies"]),
            str(fed.get("site_id", ""))[:16],
        )
    ]
    colour = {"up": "green", "suspect": "yellow", "down": "red"}
    for m in fed.get("members", []):
        state = m.get("state") or ("up" if m["up"] else "down")
        rows.append(
            (
                m["name"],
                f"[{colour.get(state, 'white')}]{state}[/]",
                ago(m.get("last_seen_s")),
                str(m["address"]),
                str(m["studies"]),
                str(m["site_id"])[:16],
            )
        )
    return rows
