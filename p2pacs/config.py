"""A site's configuration: one TOML file, ``site.toml``, in the site directory.

Every field has a working default, so ``p2pacs init`` (or the first command run against an empty
directory) yields a usable single-site archive; enrollment in a federation fills the
``[federation]`` table.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

from p2pacs import const
from p2pacs.errors import ConfigError

__all__ = [
    "CONFIG_NAME",
    "Config",
    "DicomConfig",
    "FederationConfig",
    "StoreConfig",
    "parse_hostport",
]

CONFIG_NAME = "site.toml"


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"`` (or ``"[v6]:port"``) to a tuple; a clear ConfigError otherwise."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{text!r} is not host:port")
        host, port = text.strip(), str(default_port)
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"{text!r}: port {port!r} is not a number") from None
    if not host or not 0 < number < 65536:
        raise ConfigError(f"{text!r} is not a valid host:port")
    return host, number


@dataclass(slots=True)
class StoreConfig:
    map_size: int = const.DEFAULT_MAP_SIZE  # bytes of address space for the LMDB map
    sync: bool = True  # fsync every commit; never turn off for clinical data


@dataclass(slots=True)
class DicomConfig:
    ae_title: str = const.DEFAULT_AE_TITLE
    port: int = const.DEFAULT_DICOM_PORT
    bind: str = "0.0.0.0"
    max_pdu: int = const.DEFAULT_MAX_PDU
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty: accept any calling AE
    destinations: dict[str, str] = field(default_factory=dict)  # C-MOVE AE title -> "host:port"
    network_timeout: float = 60.0  # seconds of silence before an association is dropped


@dataclass(slots=True)
class FederationConfig:
    enabled: bool = False
    name: str = ""  # site name, the CN of its certificate
    host: str = "127.0.0.1"  # address other sites use to reach this one
    bind: str = "0.0.0.0"
    dht_port: int = const.DEFAULT_DHT_PORT
    transfer_port: int = const.DEFAULT_TRANSFER_PORT
    bootstrap: list[str] = field(default_factory=list)  # "host:dht_port" of sites in other networks
    discovery: bool = True  # announce and browse with mDNS on the local network
    replication: int = const.DEFAULT_REPLICATION
    down_after: float = 30.0  # seconds without an answer before a site is considered down
    repair_interval: float = 10.0  # seconds between anti-entropy passes
    record_ttl: float = const.RECORD_TTL  # seconds a DHT record lives unless republished
    recover_give_up: float = 600.0  # seconds a study may keep failing before recover reports it


@dataclass(slots=True)
class Config:
    store: StoreConfig = field(default_factory=StoreConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)

    @classmethod
    def load(cls, path: Path) -> Config:
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"no {CONFIG_NAME} at {path.parent}; run 'p2pacs init' there"
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc
        return cls(
            store=_section(StoreConfig, raw, "store", path),
            dicom=_section(DicomConfig, raw, "dicom", path),
            federation=_section(FederationConfig, raw, "federation", path),
        )

    def save(self, path: Path) -> None:
        path.write_text(tomli_w.dumps(dataclasses.asdict(self)))


S = TypeVar("S")


def _section(kind: type[S], raw: dict[str, Any], name: str, path: Path) -> S:
    table = raw.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [{name}]: {', '.join(unknown)}")
    defaults = kind()
    values: dict[str, Any] = {}
    for key, given in table.items():
        expected = type(getattr(defaults, key))
        value = float(given) if expected is float and isinstance(given, int) else given
        if not isinstance(value, expected):
            raise ConfigError(f"{path}: [{name}] {key} must be {expected.__name__}, not {value!r}")
        values[key] = value
    return kind(**values)
