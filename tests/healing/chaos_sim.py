"""A seeded fault simulation of a federation: the core of ``test_chaos.py`` and ``bench/chaos.py``.

Real ``p2pacs serve`` processes (3-5 sites, R=2 or 3) driven by a scheduler seeded with one
integer. Each step picks, by weight, a rule whose precondition holds: ingest (C-STORE new studies
at a running site, half the time followed by a Storage Commitment request); kill (SIGKILL) and
restart; wipe (kill, wipe, restart, wait for ``recover``; sometimes with a recovery failpoint, or
killed half way); partition and heal (restart with transfer and DHT traffic failing, then
without); corrupt (flip a byte of a stored blob below the store's API; scrub --repair later);
failpoint (restart with one failpoint armed: crash at a commit, errors, delays).

Preconditions keep the run inside the promise (architecture invariant 4): fewer than R sites
faulty at once (down, partitioned, armed, or holding a corrupt blob); a destructive fault (wipe,
corrupt) at a site first waits until every study it holds or took in is whole at R healthy
sites, since an instance acknowledged a moment ago is at one site only (Storage Commitment tells
an SCU when it is safe), and happens only while no site is partitioned or armed (such a site
still looks live to its peers, so R "live" copies could include one nobody can fetch).

After each step: no site that should run has died, and one acknowledged study, C-GET from a
healthy site holding it whole, comes back byte for byte. At the end every fault is healed, the
seconds until every study has R live holders are measured, ``scrub --repair`` everywhere must
repair all it finds, every acknowledged instance must come back byte for byte from every site,
and a second scrub must find nothing.

The seed fixes the schedule (rules, sites, data, failpoints, variants): the model that decides
changes only by the scheduler's own actions, never by what it observes. Placement follows site
keys made afresh for each run, so which sites hold a study, and timing, can differ on replay.
"""

from __future__ import annotations

import enum
import random
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from p2pacs.dicom.header import extract_attributes
from p2pacs.dicom.part10 import split_part10
from p2pacs.dicom.scu import get_study, store_files
from p2pacs.errors import P2PacsError
from p2pacs.samples import generate_instances
from p2pacs.testbed import SiteProcess, Testbed, free_port, wait_for

__all__ = ["Profile", "RoundResult", "Simulation"]

NAMES = ("alpha", "bravo", "charlie", "delta", "echo")
ENV = "P2PACS_FAILPOINTS"
PARTITION = "transfer.send=error,transfer.receive=error,dht.put=error"
FAILPOINTS = (
    "store.commit=crash",
    "transfer.send=error:0.5",
    "transfer.receive=error:0.5",
    "repair.pull=error:0.5",
    "dht.put=error:0.5",
    "catalogue.publish=error:0.5",
    "transfer.send=delay:0.5",
    "repair.pull=delay:1.0",
)
# how a wiped site comes back: plainly, with a recovery failpoint, or killed half way
RECOVERY_VARIANTS = ("plain", "recovery.study=delay:0.5", "recovery.study=error:0.3", "killed")
WEIGHTS = {
    "ingest": 3.0,
    "kill": 2.0,
    "restart": 3.0,
    "wipe": 1.5,
    "corrupt": 1.0,
    "scrub": 2.0,
    "partition": 1.0,
    "heal": 2.0,
    "failpoint": 1.5,
}
FAULTS = frozenset({"kill", "wipe", "corrupt", "partition", "failpoint"})
COMMIT_AET = "CHAOSSCU"


@dataclass(frozen=True, slots=True)
class Profile:
    sites: int = 3
    replication: int = 2
    steps: int = 16
    settle_timeout: float = 60.0  # seconds for R healthy copies before a destructive fault
    heal_timeout: float = 120.0  # seconds for R live copies once every fault is healed
    recover_timeout: float = 120.0  # seconds for a wiped site's ``recover``
    commitment: bool = True  # ask for Storage Commitment after half the ingests

    def replay(self, seed: int) -> str:
        return (
            f"CHAOS_SEED={seed} CHAOS_SITES={self.sites} CHAOS_R={self.replication} "
            f"CHAOS_STEPS={self.steps} .venv/bin/pytest -s tests/healing/test_chaos.py"
        )


class Mode(enum.Enum):
    UP = "up"
    DOWN = "down"  # killed
    PARTITIONED = "partitioned"  # running, transfer and DHT traffic failing
    ARMED = "armed"  # running (or crashed, as armed) with a failpoint


@dataclass(slots=True)
class SiteModel:
    mode: Mode = Mode.UP
    spec: str = ""  # the failpoints armed
    corrupt: bool = False  # a blob was flipped and no scrub --repair has run since

    @property
    def faulty(self) -> bool:
        return self.mode is not Mode.UP or self.corrupt

    @property
    def should_run(self) -> bool:
        return self.mode in (Mode.UP, Mode.PARTITIONED) or (
            self.mode is Mode.ARMED and "crash" not in self.spec
        )


@dataclass(frozen=True, slots=True)
class Sent:
    study: str
    sop_class: str
    transfer_syntax: str
    data: bytes


@dataclass(slots=True)
class RoundResult:
    seed: int
    sites: int
    replication: int
    steps: int = 0
    faults: int = 0
    acknowledged: int = 0
    committed: int = 0
    studies: int = 0
    lost: int = 0  # acknowledged instances that no site returns byte for byte
    unserved: int = 0  # (site, instance) pairs not returned byte for byte at the end
    corrupt_served: int = 0  # instances returned with other bytes than were acknowledged
    seconds_to_r: float | None = None  # from every fault healed to R live holders of all
    seconds: float = 0.0
    trace: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    logs: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The counts, as in ``bench/chaos.py``'s JSON."""
        skip = ("trace", "problems", "logs")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["seconds_to_R"] = out.pop("seconds_to_r")
        out["seconds"] = round(self.seconds, 1)
        out["problems"] = len(self.problems)
        return out

    def report(self, replay: str = "") -> str:
        """Everything needed to understand and replay a failed round."""
        parts = [f"chaos seed {self.seed} failed; replay: {replay}", "", "steps:", *self.trace]
        parts += ["", "problems:", *self.problems]
        for name, tail in self.logs.items():
            parts += ["", f"--- {name} log (tail) ---", tail]
        return "\n".join(parts)


def read_sent(files: list[Path]) -> dict[str, Sent]:
    """SOP Instance UID -> what was sent, dataset bytes exactly as in the file."""
    out = {}
    for path in files:
        part = split_part10(path.read_bytes())
        attrs = extract_attributes(part.dataset, part.transfer_syntax)
        out[str(attrs["SOPInstanceUID"])] = Sent(
            str(attrs["StudyInstanceUID"]),
            str(attrs["SOPClassUID"]),
            part.transfer_syntax,
            bytes(part.dataset),
        )
    return out


class CommitmentSink:
    """The SCU's side of Storage Commitment (PS3.4 J): requests N-ACTION, receives the
    N-EVENT-REPORT on its own port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.committed: set[str] = set()
        self.failed: set[str] = set()
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self) -> None:
        from pynetdicom import AE, evt

        from p2pacs.dicom.uids import STORAGE_COMMITMENT_PUSH

        ae = AE(ae_title=COMMIT_AET)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH, scu_role=True, scp_role=True)
        self._server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._on_report)],
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_report(self, event: Any) -> tuple[int, None]:
        info = event.event_information
        with self._lock:
            for item in info.get("ReferencedSOPSequence", []):
                self.committed.add(str(item.ReferencedSOPInstanceUID))
            for item in info.get("FailedSOPSequence", []):
                self.failed.add(str(item.ReferencedSOPInstanceUID))
        return 0x0000, None

    def request(self, site: SiteProcess, sent: Mapping[str, Sent]) -> bool:
        """N-ACTION for ``sent`` at ``site``; True when the site took the request."""
        from pydicom.dataset import Dataset
        from pydicom.uid import generate_uid
        from pynetdicom import AE, build_role

        from p2pacs.dicom.uids import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH

        request = Dataset()
        request.TransactionUID = generate_uid()
        refs = []
        for sop_uid, s in sent.items():
            item = Dataset()
            item.ReferencedSOPClassUID = s.sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            refs.append(item)
        request.ReferencedSOPSequence = refs
        ae = AE(ae_title=COMMIT_AET)
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        assoc = ae.associate(
            site.host, site.dicom_port, ae_title=site.aet,
            ext_neg=[build_role(STORAGE_COMMITMENT_PUSH, scu_role=True)],
        )  # fmt: skip
        if not assoc.is_established:
            return False
        try:
            status, _ = assoc.send_n_action(
                request, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )
            return int(getattr(status, "Status", -1)) == 0x0000
        finally:
            assoc.release()


class StepFailed(Exception):
    """A problem that ends the steps (the final checks still run)."""


class Simulation:
    """One round: a fresh federation in ``root``, ``profile.steps`` steps, then the checks."""

    def __init__(
        self, root: Path, seed: int, profile: Profile, echo: Callable[[str], None] = print
    ):
        self.root = root
        self.profile = profile
        self.rng = random.Random(seed)
        self.echo = echo
        self.names = NAMES[: profile.sites]
        self.model = {n: SiteModel() for n in self.names}
        self.by_study: dict[str, dict[str, Sent]] = {}  # acknowledged, by study, in order
        self.origin: dict[str, str] = {}  # study -> the site it was sent to
        self.result = RoundResult(seed, profile.sites, profile.replication)
        self.sink = CommitmentSink() if profile.commitment else None
        self.started = time.monotonic()

    # ---- running

    def run(self) -> RoundResult:
        p = self.profile
        self.note(
            f"chaos seed={self.result.seed} sites={p.sites} R={p.replication} steps={p.steps}"
        )
        bed = Testbed(
            self.root / "fed", self.names, replication=p.replication, down_after=3.0,
            repair_interval=1.0, recover_give_up=60.0,
        )  # fmt: skip
        self.bed = bed
        try:
            with bed:
                if self.sink is not None:
                    self.sink.start()
                    for name in self.names:
                        site = bed[name].site
                        site.config.dicom.destinations[COMMIT_AET] = f"127.0.0.1:{self.sink.port}"
                        site.save_config()
                bed.start()
                try:
                    for i in range(p.steps):
                        self.step(i)
                except StepFailed:
                    self.note("steps stopped at the first problem; healing and checking")
                except Exception as exc:  # e.g. a C-GET association refused: still check
                    self.problem(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
                self.finish()
                if self.result.problems:
                    self.result.logs = {n: bed[n].log_tail(60) for n in self.names}
        except Exception as exc:  # anything unforeseen ends the round as a problem
            self.result.problems.append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            self.result.logs = {n: bed[n].log_tail(60) for n in self.names}
        finally:
            if self.sink is not None:
                self.sink.close()
            self.result.seconds = time.monotonic() - self.started
        return self.result

    def note(self, line: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {line}"
        self.result.trace.append(line)
        self.echo(line)

    def problem(self, what: str) -> None:
        self.note(f"PROBLEM: {what}")
        self.result.problems.append(what)

    def step(self, i: int) -> None:
        rule, name = self.choose()
        self.note(f"step {i}: {rule} {name}")
        if rule in FAULTS:
            self.result.faults += 1
        getattr(self, f"_{rule}")(self.bed[name], self.model[name])
        self.result.steps += 1
        self.check_step()
        if self.result.problems:
            raise StepFailed

    def choose(self) -> tuple[str, str]:
        """A rule (by weight) among those the model allows at some site, then one such site."""
        options = {r: [n for n in self.names if self.allowed(r, n)] for r in WEIGHTS}
        rules = [r for r, sites in options.items() if sites]
        rule = self.rng.choices(rules, [WEIGHTS[r] for r in rules])[0]
        return rule, self.rng.choice(options[rule])

    def allowed(self, rule: str, name: str) -> bool:
        m = self.model[name]
        faulty = {n for n, s in self.model.items() if s.faulty}
        fits = len(faulty | {name}) < self.profile.replication  # fewer than R faulty at once
        gray = any(s.mode in (Mode.PARTITIONED, Mode.ARMED) for s in self.model.values())
        if rule == "ingest":
            return m.mode is not Mode.DOWN
        if rule == "kill":
            return m.mode is not Mode.DOWN and fits
        if rule == "restart":
            return m.mode is Mode.DOWN
        if rule == "wipe":
            return m.mode is Mode.UP and fits and not gray
        if rule == "corrupt":
            return m.mode is Mode.UP and not m.corrupt and fits and not gray and bool(self.by_study)
        if rule == "scrub":
            return m.mode is Mode.UP and m.corrupt
        if rule in ("partition", "failpoint"):
            return m.mode is Mode.UP and fits
        if rule == "heal":
            return m.mode in (Mode.PARTITIONED, Mode.ARMED)
        raise ValueError(rule)

    # ---- rules

    def _ingest(self, site: SiteProcess, m: SiteModel) -> None:
        studies, series = self.rng.randint(1, 2), self.rng.randint(1, 2)
        per_series, data_seed = self.rng.randint(1, 4), self.rng.getrandbits(30)
        commit = self.rng.random() < 0.5
        files = generate_instances(
            self.root / "data" / str(data_seed), studies=studies, series_per_study=series,
            instances_per_series=per_series, rows=64, columns=64, seed=data_seed,
        )  # fmt: skip
        report = store_files(site.host, site.dicom_port, site.aet, files)
        acked = read_sent(report.stored)
        for sop, s in acked.items():
            self.by_study.setdefault(s.study, {})[sop] = s
            self.origin.setdefault(s.study, site.name)
        self.result.acknowledged += len(acked)
        self.note(f"  {len(acked)}/{len(files)} acknowledged at {site.name} ({m.mode.value})")
        if report.failed and m.mode is not Mode.ARMED:
            self.problem(f"C-STORE refused at {site.name} ({m.mode.value}): {report.failed}")
        if commit and acked and self.sink is not None:
            taken = self.sink.request(site, acked)
            self.note(f"  storage commitment requested: {'taken' if taken else 'refused'}")

    def _kill(self, site: SiteProcess, m: SiteModel) -> None:
        site.kill()
        m.mode, m.spec = Mode.DOWN, ""

    def _restart(self, site: SiteProcess, m: SiteModel) -> None:
        self.start(site)
        m.mode = Mode.UP

    def _wipe(self, site: SiteProcess, m: SiteModel) -> None:
        variant = self.rng.choice(RECOVERY_VARIANTS)
        if not self.wait_settled(site.name):
            return
        site.kill()
        site.wipe()
        m.corrupt = False
        self.note(f"  wiped {site.name}; recovering ({variant})")
        if variant == "killed":
            self.start(site, "recovery.study=delay:0.5")

            def some_back() -> bool:
                return int(self.status(site).get("studies", 0)) > 0

            wait_for(some_back, 30, 0.1)
            site.kill()
            self.note(f"  killed {site.name} during its recovery")
            self.start(site)
        else:
            self.start(site, variant if "=" in variant else "")
        done = self.cli(site, "recover", timeout=self.profile.recover_timeout)
        self.note(f"  {done.splitlines()[-1] if done else ''}")
        m.mode = Mode.UP

    def _corrupt(self, site: SiteProcess, m: SiteModel) -> None:
        pick, hard = self.rng.random(), self.rng.random() < 0.5
        if not self.wait_settled(site.name):
            return
        site.kill() if hard else site.stop()
        h = site.corrupt_blob(pick)
        self.note(f"  corrupted {f'blob {h[:12]}' if h else 'nothing (holds no study)'}")
        self.start(site)
        m.corrupt = True

    def _scrub(self, site: SiteProcess, m: SiteModel) -> None:
        out = self.cli(site, "scrub", "--repair")
        self.note(f"  {out.splitlines()[-1] if out else ''}")
        m.corrupt = False

    def _partition(self, site: SiteProcess, m: SiteModel) -> None:
        hard = self.rng.random() < 0.5
        site.kill() if hard else site.stop()
        self.start(site, PARTITION)
        m.mode, m.spec = Mode.PARTITIONED, PARTITION

    def _heal(self, site: SiteProcess, m: SiteModel) -> None:
        hard = self.rng.random() < 0.5
        site.kill() if hard else site.stop()
        self.start(site)
        m.mode, m.spec = Mode.UP, ""

    def _failpoint(self, site: SiteProcess, m: SiteModel) -> None:
        spec, hard = self.rng.choice(FAILPOINTS), self.rng.random() < 0.5
        self.note(f"  arming {spec}")
        site.kill() if hard else site.stop()
        self.start(site, spec)
        m.mode, m.spec = Mode.ARMED, spec

    # ---- observing

    def start(self, site: SiteProcess, failpoints: str = "") -> None:
        try:
            site.start(env={ENV: failpoints})
        except P2PacsError as exc:
            site.kill()  # reap what is left of the process
            if "crash" in failpoints:
                self.note(f"  {site.name} crashed while starting, as armed")
            else:
                self.problem(f"{site.name} did not start: {exc}")

    def cli(self, site: SiteProcess, *args: str, timeout: float = 120.0) -> str:
        """Run a ``p2pacs`` command at ``site``; a non-zero exit is a problem."""
        try:
            done = site.run_cli(*args, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.problem(f"'p2pacs {' '.join(args)}' at {site.name} took over {timeout:.0f} s")
            return ""
        out = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace")[-2000:]
            self.problem(f"'p2pacs {' '.join(args)}' at {site.name} exited {done.returncode}: "
                         f"{out}\n{err}")  # fmt: skip
        return out

    def status(self, site: SiteProcess) -> dict[str, Any]:
        try:
            return site.status()
        except (P2PacsError, OSError):
            return {}

    def holders(self, observer: SiteProcess, study: str) -> tuple[set[str], set[str]]:
        """As ``observer`` sees it, the sites holding every acknowledged instance of ``study``:
        (all of them, the live ones)."""
        want = len(self.by_study[study])
        try:
            found = observer.find(study)
        except (P2PacsError, OSError):
            return set(), set()
        whole = [
            (h["name"].removesuffix(" (this site)"), h) for h in found if h["instances"] >= want
        ]
        return {n for n, _ in whole}, {n for n, h in whole if h["up"]}

    def settled(self, target: str) -> bool:
        """Every study ``target`` holds whole (or took in) is whole at R sites that are healthy
        or ``target``: losing ``target``'s copy then leaves R-1 good ones. A study it holds in
        part only (its only whole copy at a killed site, say) is no concern of ``target``.

        And ``target`` has published its site record: a site wiped before its first record
        went out has no past anyone can vouch for, so it waits for ``serve --new-site`` (by
        design: absence is never taken as evidence)."""
        fed = self.status(self.bed[target]).get("federation") or {}
        if not fed.get("site_record"):
            return False
        ok = {n for n, s in self.model.items() if not s.faulty} | {target}
        for study in self.by_study:
            whole, live = self.holders(self.bed[target], study)
            mine = target in whole or self.origin[study] == target
            if mine and len(live & ok) < self.profile.replication:
                return False
        return True

    def wait_settled(self, target: str) -> bool:
        start = time.monotonic()
        if wait_for(lambda: self.settled(target), self.profile.settle_timeout, 0.5):
            self.note(
                f"  settled: R healthy copies of its studies after {time.monotonic() - start:.1f} s"
            )
            return True
        self.problem(
            f"R={self.profile.replication} healthy copies not reached in "
            f"{self.profile.settle_timeout:.0f} s while only killed sites are faulty: "
            f"{ {n: s.mode.value for n, s in self.model.items()} }"
        )
        return False

    def retrieve(self, site: SiteProcess, study: str) -> tuple[set[str], set[str]]:
        """C-GET ``study`` at ``site``: (instances missing, instances with other bytes)."""
        want = self.by_study[study]
        contexts = sorted({(s.sop_class, s.transfer_syntax) for s in want.values()})
        got = get_study(site.host, site.dicom_port, site.aet, study, contexts)
        wrong = {sop for sop, s in want.items() if sop in got and got[sop] != s.data}
        return {sop for sop in want if sop not in got}, wrong

    def check_step(self) -> None:
        for name, m in self.model.items():
            if m.should_run and not self.bed[name].running:
                self.problem(f"{name} ({m.mode.value} {m.spec}) died")
        pick = self.rng.random()
        healthy = [n for n, s in self.model.items() if not s.faulty]
        if not self.by_study or not healthy:
            return
        study = list(self.by_study)[int(pick * len(self.by_study))]
        holders = sorted(self.holders(self.bed[healthy[0]], study)[1] & set(healthy))
        if not holders:
            self.note(f"  check: no healthy site holds ..{study[-10:]} whole yet")
            return
        missing, wrong = self.retrieve(self.bed[holders[0]], study)
        self.result.corrupt_served += len(wrong)
        if missing or wrong:
            self.problem(
                f"C-GET of ..{study[-10:]} at {holders[0]}, a healthy whole holder: "
                f"{len(missing)} missing, {len(wrong)} wrong bytes"
            )
        else:
            self.note(f"  check: ..{study[-10:]} byte-identical from {holders[0]}")

    # ---- the end of the round

    def finish(self) -> None:
        r = self.profile.replication
        for name, m in self.model.items():
            site = self.bed[name]
            if m.mode is not Mode.UP or not site.running:
                site.kill()
                self.start(site)
                m.mode, m.spec = Mode.UP, ""
        healed = time.monotonic()
        self.note("every fault healed; waiting for R live holders of every study")
        observer = self.bed[self.names[0]]
        counts = {s: len(sops) for s, sops in self.by_study.items()}
        if wait_for(
            lambda: observer.holds_whole(set(counts), r, counts), self.profile.heal_timeout, 0.5
        ):
            self.result.seconds_to_r = round(time.monotonic() - healed, 1)
            self.note(
                f"  R={r} live holders of {len(counts)} studies after {self.result.seconds_to_r} s"
            )
        else:
            self.problem(
                f"R={r} live holders not reached {self.profile.heal_timeout:.0f} s after healing"
            )
        for name in self.names:
            out = self.cli(self.bed[name], "scrub", "--repair")
            self.note(f"  scrub --repair at {name}: {out.splitlines()[-1] if out else ''}")
            self.model[name].corrupt = False
        good: dict[str, int] = {}
        for name in self.names:
            bad = 0
            for study in self.by_study:
                missing, wrong = self.retrieve(self.bed[name], study)
                self.result.corrupt_served += len(wrong)
                bad += len(missing | wrong)
                for sop in set(self.by_study[study]) - missing - wrong:
                    good[sop] = good.get(sop, 0) + 1
            self.result.unserved += bad
            self.note(f"  C-GET of every study at {name}: {bad} not byte-identical")
        acknowledged = {sop for sops in self.by_study.values() for sop in sops}
        self.result.lost = len(acknowledged - set(good))
        self.result.studies = len(self.by_study)
        for name in self.names:
            self.cli(self.bed[name], "scrub")
        if self.sink is not None:
            self.result.committed = len(self.sink.committed & acknowledged)
            self.note(f"  storage commitment: {self.result.committed} committed, "
                      f"{len(self.sink.failed)} reported failed")  # fmt: skip
        if self.result.lost or self.result.unserved or self.result.corrupt_served:
            self.problem(
                f"{self.result.lost} lost, {self.result.unserved} not served byte for byte, "
                f"{self.result.corrupt_served} served corrupt"
            )
