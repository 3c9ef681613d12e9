"""A checker of the DICOM audit message structure (PS3.15 A.5.1), written from the standard's
schema, and the message-specific rules of A.5.3 the site's messages must follow.

``check_schema`` raises AssertionError naming the first rule a message breaks; ``parse`` gives
the parts tests look at.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import ipaddress
import json
import socket
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CODED = ("csd-code", "codeSystemName", "originalText")
ACTIONS = {"C", "R", "U", "D", "E"}
OUTCOMES = {"0", "4", "8", "12"}
NAP_TYPES = {"1", "2", "3", "4", "5"}
OBJECT_TYPES = {"1", "2", "3", "4"}
OBJECT_ROLES = {str(i) for i in range(1, 27)}
TOP_ORDER = ["EventIdentification", "ActiveParticipant", "AuditSourceIdentification",
             "ParticipantObjectIdentification"]  # fmt: skip
OBJECT_ORDER = ["ParticipantObjectIDTypeCode", "ParticipantObjectName|ParticipantObjectQuery",
                "ParticipantObjectDetail", "ParticipantObjectDescription"]  # fmt: skip


def _coded(elem: ET.Element, where: str) -> None:
    for attr in CODED:
        assert elem.get(attr), f"{where}: coded value without {attr}"
    assert set(elem.attrib) <= {*CODED, "displayName"}, f"{where}: attributes {elem.attrib}"


def _in_order(children: list[ET.Element], order: list[str], where: str) -> None:
    rank = {name: i for i, group in enumerate(order) for name in group.split("|")}
    last = -1
    for child in children:
        assert child.tag in rank, f"{where}: unexpected element {child.tag}"
        assert rank[child.tag] >= last, f"{where}: {child.tag} out of order"
        last = rank[child.tag]


def _boolean(text: str | None, where: str) -> None:
    assert text in ("true", "false", "1", "0"), f"{where}: {text!r} is not xsd:boolean"


def check_schema(xml: bytes) -> ET.Element:
    """The message against the A.5.1 schema; the root element when it holds."""
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage", root.tag
    children = list(root)
    _in_order(children, TOP_ORDER, "AuditMessage")
    tags = [c.tag for c in children]
    assert tags.count("EventIdentification") == 1
    assert tags.count("ActiveParticipant") >= 1
    assert tags.count("AuditSourceIdentification") == 1

    ident = root.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventActionCode", "E") in ACTIONS
    assert ident.get("EventOutcomeIndicator") in OUTCOMES
    stamp = ident.get("EventDateTime", "")
    dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # xsd:dateTime
    _in_order(list(ident), ["EventID", "EventTypeCode", "EventOutcomeDescription"], "Event")
    assert len(ident.findall("EventID")) == 1
    for code in (*ident.findall("EventID"), *ident.findall("EventTypeCode")):
        _coded(code, "EventIdentification")

    for p in root.findall("ActiveParticipant"):
        assert p.get("UserID") is not None, "ActiveParticipant without UserID"
        _boolean(p.get("UserIsRequestor"), "UserIsRequestor")
        if p.get("NetworkAccessPointTypeCode") is not None:
            assert p.get("NetworkAccessPointTypeCode") in NAP_TYPES
        for child in p:
            assert child.tag in ("RoleIDCode", "MediaIdentifier"), child.tag
            if child.tag == "RoleIDCode":
                _coded(child, "RoleIDCode")

    src = root.find("AuditSourceIdentification")
    assert src is not None and src.get("AuditSourceID"), "AuditSourceID missing"
    for child in src:
        assert child.tag == "AuditSourceTypeCode" and child.get("csd-code"), child.tag

    for obj in root.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID"), "ParticipantObjectID missing"
        assert obj.get("ParticipantObjectTypeCode", "1") in OBJECT_TYPES
        assert obj.get("ParticipantObjectTypeCodeRole", "1") in OBJECT_ROLES
        _in_order(list(obj), OBJECT_ORDER, "ParticipantObjectIdentification")
        ids = obj.findall("ParticipantObjectIDTypeCode")
        assert len(ids) == 1
        _coded(ids[0], "ParticipantObjectIDTypeCode")
        assert (
            len(obj.findall("ParticipantObjectName")) + len(obj.findall("ParticipantObjectQuery"))
            <= 1
        )
        for q in obj.findall("ParticipantObjectQuery"):
            base64.b64decode(q.text or "", validate=True)
        for d in obj.findall("ParticipantObjectDetail"):
            assert d.get("type"), "ParticipantObjectDetail without type"
            try:
                base64.b64decode(d.get("value") or "", validate=True)
            except binascii.Error as exc:
                raise AssertionError(f"ParticipantObjectDetail value not base64: {exc}") from exc
        for desc in obj.findall("ParticipantObjectDescription"):
            for sop in desc:
                assert sop.tag in ("MPPS", "Accession", "SOPClass",
                                   "ParticipantObjectContainsStudy", "Encrypted",
                                   "Anonymized"), sop.tag  # fmt: skip
                if sop.tag == "SOPClass":
                    assert int(sop.get("NumberOfInstances", "x")) >= 0
    return root


@dataclass
class Message:
    event_id: str
    action: str
    outcome: int
    types: list[str]
    participants: list[dict[str, str]]  # attributes plus "role" (its csd-code)
    objects: list[dict[str, object]]  # attributes plus "id_type", "sop_classes", "query"
    source_id: str


def parse(xml: bytes) -> Message:
    """The message's parts, after ``check_schema``."""
    root = check_schema(xml)
    ident = root.find("EventIdentification")
    assert ident is not None
    event_id = ident.find("EventID")
    assert event_id is not None
    participants = []
    for p in root.findall("ActiveParticipant"):
        role = p.find("RoleIDCode")
        participants.append(
            {**p.attrib, "role": role.get("csd-code", "") if role is not None else ""}
        )
    objects: list[dict[str, object]] = []
    for o in root.findall("ParticipantObjectIdentification"):
        id_type = o.find("ParticipantObjectIDTypeCode")
        assert id_type is not None
        query = o.find("ParticipantObjectQuery")
        objects.append(
            {
                **o.attrib,
                "id_type": f"{id_type.get('csd-code')}/{id_type.get('codeSystemName')}",
                "sop_classes": [
                    (s.get("UID", ""), int(s.get("NumberOfInstances", "0")))
                    for s in o.iter("SOPClass")
                ],
                "query": base64.b64decode(query.text or "") if query is not None else None,
                "details": {
                    d.get("type"): base64.b64decode(d.get("value") or "")
                    for d in o.findall("ParticipantObjectDetail")
                },
            }
        )
    src = root.find("AuditSourceIdentification")
    assert src is not None
    return Message(
        event_id=event_id.get("csd-code", ""),
        action=ident.get("EventActionCode", ""),
        outcome=int(ident.get("EventOutcomeIndicator", "-1")),
        types=[t.get("csd-code", "") for t in ident.findall("EventTypeCode")],
        participants=participants,
        objects=objects,
        source_id=src.get("AuditSourceID", ""),
    )


def role(msg: Message, code: str) -> dict[str, str]:
    """The one participant with RoleIDCode ``code``."""
    found = [p for p in msg.participants if p["role"] == code]
    assert len(found) == 1, f"{len(found)} participants with role {code}: {msg.participants}"
    return found[0]


def objects(msg: Message, id_type: str) -> list[dict[str, object]]:
    return [o for o in msg.objects if o["id_type"] == id_type]


# --- a real syslog receiver: Debian's rsyslog with its TLS input (imtcp + ossl) ----------------

RSYSLOGD = "/usr/sbin/rsyslogd"
READY_TIMEOUT = 20.0  # seconds for rsyslogd to listen


def make_ca_and_server_cert(folder: Path, cn: str = "audit-repository") -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cn} CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return paths


CONFIG = """\
global(
  workDirectory="{work}"
  maxMessageSize="256k"
  defaultNetstreamDriver="ossl"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="{auth}")
module(load="imudp")
template(name="audit" type="list" option.json="on") {{
  constant(value="{{\\"pri\\":\\"") property(name="pri")
  constant(value="\\",\\"app\\":\\"") property(name="app-name")
  constant(value="\\",\\"msgid\\":\\"") property(name="msgid")
  constant(value="\\",\\"sd\\":\\"") property(name="structured-data")
  constant(value="\\",\\"procid\\":\\"") property(name="procid")
  constant(value="\\",\\"input\\":\\"") property(name="inputname")
  constant(value="\\",\\"msg\\":\\"") property(name="msg")
  constant(value="\\"}}\\n")
}}
ruleset(name="audit") {{
  action(type="omfile" file="{out}" template="audit" flushOnTXEnd="on" asyncWriting="off")
}}
input(type="imtcp" address="127.0.0.1" port="{tls_port}" ruleset="audit")
input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="audit")
"""


class Rsyslog:
    """rsyslogd as a process of the test: its own config, pid file and work directory, a TLS
    listener (RFC 5425) and a UDP one (RFC 5426) on loopback, each message written to a file
    as one JSON line with the fields rsyslog parsed out of it."""

    def __init__(
        self, folder: Path, tls_port: int, udp_port: int, *, client_ca: Path | None = None
    ):
        """``client_ca``: require client certificates issued by it (``x509/certvalid``)."""
        self.dir = folder
        self.tls_port, self.udp_port = tls_port, udp_port
        self.ca, self.cert, self.key = make_ca_and_server_cert(folder / "pki")
        trusted = self.ca
        if client_ca is not None:  # one CA file for both: ours and the clients' issuer
            trusted = folder / "pki" / "trusted.pem"
            trusted.write_bytes(self.ca.read_bytes() + client_ca.read_bytes())
        self.out = folder / "received.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None
        (folder / "work").mkdir(parents=True, exist_ok=True)
        self.conf = folder / "rsyslog.conf"
        self.conf.write_text(
            CONFIG.format(
                work=folder / "work",
                auth="x509/certvalid" if client_ca is not None else "anon",
                ca=trusted,
                cert=self.cert,
                key=self.key,
                out=self.out,
                tls_port=tls_port,
                udp_port=udp_port,
            )
        )

    def start(self) -> None:
        pidfile = self.dir / "rsyslogd.pid"
        pidfile.unlink(missing_ok=True)
        log = (self.dir / "rsyslogd.log").open("ab")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(pidfile)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited: {(self.dir / 'rsyslogd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.tls_port), 0.5):
                    return
            except OSError:
                time.sleep(0.05)  # polling a port until it listens: no event to wait on
        raise RuntimeError("rsyslogd did not listen in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def received(self) -> list[dict[str, str]]:
        """The records rsyslog has written whole: a line it is still writing (no newline yet) is
        left for the next read."""
        if not self.out.exists():
            return []
        text = self.out.read_text()
        complete = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def wait_for(
        self, check: Callable[[list[dict[str, str]]], bool], timeout: float = 60.0
    ) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if check(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.1)  # the receiver writes a file: poll it, bounded


def xml_of(record: dict[str, str]) -> bytes:
    """The audit message of a received record (rsyslog keeps the BOM at the start of MSG)."""
    return record["msg"].encode().removeprefix(b"\xef\xbb\xbf")
