"""A private LAN of network namespaces joined by a bridge, for partition tests (needs root).

Each site gets its own namespace and address; the test process reaches them through one more
veth from its own namespace. ``cut(i)`` sets site i's link on the bridge down, the way a failed
switch port or a cut cable partitions a hospital site; ``heal(i)`` brings it back.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from types import TracebackType

__all__ = ["Lan", "netns_available"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def netns_available() -> str | None:
    """None when namespaces can be created here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"p2chk{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot create a network namespace here: {exc}"
    return None


class Lan:
    def __init__(self, sites: int):
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.{77 + int(self.tag[:2], 16) % 100}.0"
        self.bridge_ns = f"p2b{self.tag}"
        self.site_ns = [f"p2s{i}{self.tag}" for i in range(sites)]
        self.hosts = [f"{self.subnet}.{i + 1}" for i in range(sites)]
        self.root_if = f"p2r{self.tag}"

    def __enter__(self) -> Lan:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def _create(self) -> None:
        b = self.bridge_ns
        _ip("netns", "add", b)
        _ip("-n", b, "link", "add", "br0", "type", "bridge")
        _ip("-n", b, "link", "set", "br0", "up")
        for i, (ns, host) in enumerate(zip(self.site_ns, self.hosts, strict=True)):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "link",
                "add",
                f"p2v{i}{self.tag}",
                "type",
                "veth",
                "peer",
                "name",
                f"p2b{i}{self.tag}",
            )
            _ip("link", "set", f"p2v{i}{self.tag}", "netns", ns, "name", "eth0")
            _ip("link", "set", f"p2b{i}{self.tag}", "netns", b)
            _ip("-n", b, "link", "set", f"p2b{i}{self.tag}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{host}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("link", "add", self.root_if, "type", "veth", "peer", "name", f"p2bh{self.tag}")
        _ip("link", "set", f"p2bh{self.tag}", "netns", b)
        _ip("-n", b, "link", "set", f"p2bh{self.tag}", "master", "br0", "up")
        _ip("addr", "add", f"{self.subnet}.254/24", "dev", self.root_if)
        _ip("link", "set", self.root_if, "up")

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.site_ns[i])

    def cut(self, i: int) -> None:
        _ip("-n", self.bridge_ns, "link", "set", f"p2b{i}{self.tag}", "down")

    def heal(self, i: int) -> None:
        _ip("-n", self.bridge_ns, "link", "set", f"p2b{i}{self.tag}", "up")

    def close(self) -> None:
        for args in (
            ("link", "del", self.root_if),
            *(("netns", "del", ns) for ns in self.site_ns),
            ("netns", "del", self.bridge_ns),
        ):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _ip(*args)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
