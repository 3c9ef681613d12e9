"""Zero-configuration discovery of federation members on the local network (mDNS / DNS-SD).

Each site announces ``_p2pacs._tcp.local.`` with its site_id, the federation fingerprint and
its ports in TXT records, and its DICOM gateway as ``_dicom._tcp.local.`` (PS3.15 Annex H) so
DNS-SD-aware DICOM software finds it too. Browsing keeps only sites of the same federation; the
TXT records carry identifiers and ports only, never patient data. A discovered address is a
hint: membership is proven later by the DHT handshake and mutual TLS, and liveness by
heartbeats (mDNS does not notice a partition until its records expire).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from dht.membership import Federation, Identity
from p2pacs import __version__

__all__ = ["DICOM_SERVICE", "SERVICE", "DiscoveredSite", "Discovery"]

log = logging.getLogger(__name__)

SERVICE = "_p2pacs._tcp.local."
DICOM_SERVICE = "_dicom._tcp.local."
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True, slots=True)
class DiscoveredSite:
    site_id: bytes
    name: str
    host: str
    dht_port: int
    transfer_port: int
    dicom_port: int


def _txt(props: dict[bytes, bytes | None], key: str) -> str:
    value = props.get(key.encode())
    return value.decode(errors="replace") if value else ""


def parse_service(
    props: dict[bytes, bytes | None], addresses: list[str], fingerprint: str
) -> DiscoveredSite | None:
    """A member site from its TXT records, or None for another federation or bad records."""
    if _txt(props, "fed") != fingerprint or not addresses:
        return None
    try:
        return DiscoveredSite(
            site_id=bytes.fromhex(_txt(props, "id")),
            name=_txt(props, "name"),
            host=addresses[0],
            dht_port=int(_txt(props, "dht")),
            transfer_port=int(_txt(props, "xfer")),
            dicom_port=int(_txt(props, "dicom") or 0),
        )
    except ValueError:
        return None


class Discovery:
    def __init__(
        self,
        identity: Identity,
        federation: Federation,
        *,
        host: str,
        dht_port: int,
        transfer_port: int,
        dicom_port: int,
        ae_title: str,
        interfaces: list[str] | None = None,
    ):
        self.identity = identity
        self.fingerprint = federation.fingerprint
        self.host = host
        self.ports = (dht_port, transfer_port, dicom_port)
        self.ae_title = ae_title
        self.interfaces = interfaces
        self.on_found: Callable[[DiscoveredSite], None] | None = None
        self._found: dict[bytes, DiscoveredSite] = {}
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._infos: list[AsyncServiceInfo] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def found(self) -> list[DiscoveredSite]:
        return list(self._found.values())

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=self.interfaces or sorted({"127.0.0.1", self.host}))
        sid = self.identity.site_id.hex()
        addr = socket.inet_aton(self.host)
        dht, xfer, dicom = self.ports
        label = f"{self.identity.name}-{sid[:8]}"
        props = {
            "id": sid,
            "fed": self.fingerprint,
            "name": self.identity.name,
            "dht": str(dht),
            "xfer": str(xfer),
            "dicom": str(dicom),
            "v": __version__,
        }
        self._infos = [
            AsyncServiceInfo(
                SERVICE, f"{label}.{SERVICE}", addresses=[addr], port=xfer, properties=props
            ),
            AsyncServiceInfo(
                DICOM_SERVICE,
                f"{label}.{DICOM_SERVICE}",
                addresses=[addr],
                port=dicom,
                properties={"aet": self.ae_title, "txtvers": "1"},
            ),
        ]
        # browse first, then probe both names at once: each registration probes for ~1 s
        # (RFC 6762 8.1), so doing them one after the other doubled the start-up time
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE], handlers=[self._on_change]
        )
        await asyncio.gather(
            *(self._zc.async_register_service(info, allow_name_change=True) for info in self._infos)
        )

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        task = asyncio.ensure_future(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS):
            return
        site = parse_service(dict(info.properties), info.parsed_addresses(), self.fingerprint)
        if site is None or site.site_id == self.identity.site_id:
            return
        if self._found.get(site.site_id) != site:
            log.info("discovered site %s at %s (mDNS)", site.name, site.host)
            self._found[site.site_id] = site
            if self.on_found is not None:
                self.on_found(site)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None:
            for info in self._infos:
                await self._zc.async_unregister_service(info)
            await self._zc.async_close()
            self._zc = None
