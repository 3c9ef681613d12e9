"""Keep docker/ honest without a Docker engine: every p2pacs command it runs must parse with the
real CLI, and the Orthanc configs must point at the sites that were enrolled for them."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pacs import const
from p2pacs.cli import build_parser

DOCKER = Path(__file__).parents[1] / "docker"


def _parse(argv: list[str]) -> Any:
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"the p2pacs CLI rejects: p2pacs {shlex.join(argv)}")


def _compose() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCKER / "compose.yml").read_text()))


def _enrollments() -> list[list[str]]:
    """The argv of every 'p2pacs site enroll' the enroll script runs, variables substituted."""
    script = (DOCKER / "enroll.sh").read_text()
    template = next(
        line.strip()
        for line in script.splitlines()
        if line.strip().startswith("p2pacs site enroll")
    )
    calls = re.findall(r"^enroll (\S+) (\S+) (\S+)$", script, flags=re.MULTILINE)
    assert len(calls) == 3, "the testbed enrolls a research lab and two clinical sites"
    out = []
    for name, aet, extra in calls:
        line = (
            template.replace('"$FED"', "/federation")
            .replace("$1", name)
            .replace("$2", aet)
            .replace("$3", extra)
        )
        out.append(shlex.split(line)[1:])
    return out


def test_every_p2pacs_command_parses() -> None:
    services = _compose()["services"]
    site_services = [s for s in services.values() if s.get("image") == "p2pacs:latest"]
    assert len(site_services) >= 4  # enroll + three sites
    for service in site_services:
        if "command" in service and "entrypoint" not in service:
            args = _parse(list(service["command"]))
            assert args.command == "serve"
            assert str(args.site) == "/var/lib/p2pacs/site"
    script = (DOCKER / "enroll.sh").read_text()
    (create,) = [
        line.strip() for line in script.splitlines() if line.strip().startswith("p2pacs federation")
    ]
    args = _parse(shlex.split(create.replace('"$FED"', "/federation"))[1:])
    assert args.command == "federation" and str(args.out) == "/federation"
    for argv in _enrollments():
        args = _parse(argv)
        assert args.command == "site" and args.no_discovery


def test_orthanc_configs_match_the_enrolled_sites() -> None:
    enrolled = {}
    for argv in _enrollments():
        args = _parse(argv)
        enrolled[args.name] = args
    services = _compose()["services"]
    for clinic in ("a", "b"):
        site = enrolled[f"clinic-{clinic}"]
        config = json.loads((DOCKER / "orthanc" / f"orthanc-{clinic}.json").read_text())
        ae, host, port = config["DicomModalities"]["p2pacs"]
        assert (ae, host, port) == (site.aet, f"clinic-{clinic}", site.dicom_port)
        assert f"clinic-{clinic}" in services, "the modality host must be a compose service"
        (destination,) = site.destination
        dest_ae, _, dest_addr = destination.partition("=")
        dest_host, _, dest_port = dest_addr.partition(":")
        assert dest_ae == config["DicomAet"]
        assert int(dest_port) == config["DicomPort"]
        assert dest_host == f"orthanc-{clinic}" and dest_host in services
        assert services[dest_host]["environment"]["TCP_NODELAY"] == "1"
    lab = enrolled["lab"]
    for args in enrolled.values():
        assert args.bootstrap == [f"lab:{lab.dht_port}"]


def test_sites_serve_the_directory_they_were_enrolled_into() -> None:
    """enroll writes /sites/NAME/site on volume NAME; the site container must open that path."""
    services = _compose()["services"]
    enroll_mounts = dict(v.split(":")[:2][::-1] for v in services["enroll"]["volumes"])
    for argv in _enrollments():
        args = _parse(argv)
        service = services[args.name]
        assert service.get("hostname", args.name) == args.host
        out = Path(str(args.out))
        volume = enroll_mounts[str(out.parent)]
        (mount,) = [v.split(":")[1] for v in service["volumes"] if v.split(":")[0] == volume]
        served = _parse(list(service["command"]))
        assert Path(str(served.site)) == Path(mount) / out.name


def test_readme_commands_parse() -> None:
    """Every `p2pacs ...` the README tells an operator to run must be accepted by the real CLI."""
    readme = (DOCKER / "README.md").read_text()
    found = 0
    for line in readme.splitlines():
        words = shlex.split(line.split("#")[0]) if " p2pacs " in line else []
        if "p2pacs" in words and words[0] == "docker":
            _parse(words[words.index("p2pacs") + 1 :])
            found += 1
    assert found >= 4


def test_dockerfile_runs_unprivileged_and_checks_health() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    exposed = set(re.search(r"^EXPOSE\s+(.+)$", text, flags=re.MULTILINE)[1].split())  # type: ignore[index]
    assert exposed == {
        str(const.DEFAULT_DICOM_PORT),
        str(const.DEFAULT_TRANSFER_PORT),
        f"{const.DEFAULT_DHT_PORT}/udp",
    }
    for argv in _enrollments():
        args = _parse(argv)
        ports = {str(args.dicom_port), str(args.transfer_port), f"{args.dht_port}/udp"}
        assert ports == exposed, f"site {args.name} listens on {ports}, the image exposes {exposed}"
    health = re.search(r'CMD \["p2pacs", (.+)\]\s*$', text, flags=re.MULTILINE)
    assert health is not None
    argv = json.loads(f"[{health[1]}]")
    assert _parse(argv).command == "status"
