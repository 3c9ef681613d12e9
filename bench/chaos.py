"""The seeded fault simulation, run for minutes: round after round of a fresh federation.

Each round starts 3-5 ``p2pacs serve`` processes (R=2 or 3), takes ``--steps`` seeded steps of
ingest, SIGKILL, restart, wipe and recovery, partition and heal, blob corruption and failpoints
(the rules and their preconditions are in ``tests/healing/chaos_sim.py``), then heals every
fault, measures the seconds until every study has R live holders, scrubs, and retrieves every
acknowledged instance from every site by C-GET, byte for byte. Round ``i`` uses seed
``--seed + i``; a failed round prints its seed and how to replay it, and keeps its directory.
Last line: a JSON object (``lost`` and ``corrupt_served`` must be 0).

    python bench/chaos.py --minutes 5                              # 3 sites, R=2
    python bench/chaos.py --minutes 5 --sites 5 --replication 3
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.healing

from tests.healing.chaos_sim import Profile, RoundResult, Simulation


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=5.0, help="start no round after this")
    parser.add_argument("--sites", type=int, default=3, choices=range(3, 6))
    parser.add_argument("--replication", type=int, default=2, choices=(2, 3))
    parser.add_argument("--steps", type=int, default=30, help="steps per round")
    parser.add_argument("--seed", type=int, default=None, help="seed of the first round")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many (0: time)")
    parser.add_argument("--no-commitment", action="store_true", help="skip Storage Commitment")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every round's site processes are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.replication >= args.sites:
        parser.error("--replication must be below --sites (a site must be able to fail)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    profile = Profile(
        sites=args.sites,
        replication=args.replication,
        steps=args.steps,
        commitment=not args.no_commitment,
    )
    root = Path(tempfile.mkdtemp(prefix="p2pacs-bench-chaos-"))
    log(f"chaos: first seed {seed}, {args.sites} sites, R={args.replication}; working in {root}")
    deadline = time.monotonic() + args.minutes * 60
    results: list[RoundResult] = []
    failed: list[int] = []
    while time.monotonic() < deadline and not (args.rounds and len(results) >= args.rounds):
        round_seed = seed + len(results)
        round_dir = root / f"round-{round_seed}"
        result = Simulation(round_dir, round_seed, profile, echo=log).run()
        results.append(result)
        log(json.dumps(result.summary()))
        if result.problems:
            failed.append(round_seed)
            replay = (
                f"python bench/chaos.py --seed {round_seed} --rounds 1 --sites {args.sites} "
                f"--replication {args.replication} --steps {args.steps}"
            )
            log(result.report(replay))
            log(f"kept {round_dir}")
        else:
            shutil.rmtree(round_dir, ignore_errors=True)
    times = [r.seconds_to_r for r in results if r.seconds_to_r is not None]
    summary = {
        "rounds": len(results),
        "steps": sum(r.steps for r in results),
        "faults": sum(r.faults for r in results),
        "acknowledged": sum(r.acknowledged for r in results),
        "committed": sum(r.committed for r in results),
        "lost": sum(r.lost for r in results),
        "unserved": sum(r.unserved for r in results),
        "corrupt_served": sum(r.corrupt_served for r in results),
        "max_seconds_to_R": max(times, default=None),
        "R_not_restored": sum(r.seconds_to_r is None for r in results),
        "problems": sum(len(r.problems) for r in results),
        "failed_seeds": failed,
        "seed": seed,
        "sites": args.sites,
        "replication": args.replication,
        "steps_per_round": args.steps,
        "minutes": round(sum(r.seconds for r in results) / 60, 1),
    }
    if not failed:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
