"""Transcoding on retrieve: what a C-GET costs when the requester does not take the stored syntax.

One study of N generated 512 x 512 CT instances, stored as JPEG 2000 Lossless (compressed here
with p2pacs's own transcoder) or RLE Lossless, in ``p2pacs serve`` (standalone site, its own
process). dcmtk ``getscu -S +B`` retrieves the whole study
- proposing the stored syntax first (``+xv`` / ``+xr``): the gateway accepts it, every
  instance goes out as stored (the direct path) — the baseline, on the same bytes;
- with no ``+x`` option (uncompressed only): every instance is decoded and sent as Explicit VR
  Little Endian.
Rounds alternate; each figure is the best of ``--rounds``. TCP_NODELAY=1 for dcmtk. CPU per
instance is the server process's user+system time over the retrieval. Last line: JSON.

    python bench/transcode.py --instances 100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrieve import _run, _wait, cpu_seconds, p2pacs_server

from p2pacs.dicom import build_prefix, split_part10
from p2pacs.dicom.transcode import Plan, transcode
from p2pacs.samples import generate_instances

from interop_peers import tool_path  # type: ignore[import-not-found,unused-ignore]

SYNTAXES = {  # stored syntax -> (name, getscu option proposing it first)
    "1.2.840.10008.1.2.4.90": ("j2k", "+xv"),
    "1.2.840.10008.1.2.5": ("rle", "+xr"),
}


def compressed_copies(src: list[Path], out: Path, ts: str) -> int:
    """Write ``src`` re-encoded in ``ts`` into ``out``; the total dataset bytes."""
    out.mkdir(parents=True)
    total = 0
    for path in src:
        part = split_part10(path.read_bytes())
        data = transcode(part.dataset, part.transfer_syntax, Plan(ts))
        header = pydicom.dcmread(path, stop_before_pixels=True)
        prefix = build_prefix(str(header.SOPClassUID), str(header.SOPInstanceUID), ts)
        (out / path.name).write_bytes(prefix + data)
        total += len(data)
    return total


def get_study(server: object, study: str, option: str | None, out: Path) -> tuple[float, float]:
    """(seconds, server CPU seconds) of one getscu of the study into ``out``."""
    out.mkdir(parents=True)
    pid, port, aet = (getattr(server, k) for k in ("pid", "port", "aet"))
    cmd = [tool_path("getscu"), "-S", "-aec", aet, "+B", "-od", str(out)]
    cmd += [option] if option else []
    cmd += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}"]
    cmd += ["127.0.0.1", str(port)]
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    _wait([_run(cmd)])
    return time.perf_counter() - t0, cpu_seconds(pid) - cpu0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--instances", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    n = args.instances
    result: dict[str, float | int] = {"instances": n, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix="bench-transcode-") as tmp:
        root = Path(tmp)
        plain = generate_instances(
            root / "plain", studies=1, series_per_study=1, instances_per_series=n,
            rows=512, columns=512, seed=7, implicit_vr_every=0,
        )  # fmt: skip
        study = str(pydicom.dcmread(plain[0], stop_before_pixels=True).StudyInstanceUID)
        for ts, (name, option) in SYNTAXES.items():
            size = compressed_copies(plain, root / name, ts)
            result[f"{name}_mb"] = round(size / 1e6, 1)
            best: dict[str, tuple[float, float]] = {}
            with p2pacs_server(root / f"site-{name}", root / name, {}) as server:
                for r in range(args.rounds):
                    for mode, opt in (("stored", option), ("transcoded", None)):
                        got = get_study(server, study, opt, root / f"out-{name}-{mode}-{r}")
                        files = list((root / f"out-{name}-{mode}-{r}").iterdir())
                        if len(files) != n:
                            raise RuntimeError(f"{name} {mode}: got {len(files)} of {n} files")
                        if mode not in best or got[0] < best[mode][0]:
                            best[mode] = got
            for mode, (seconds, cpu) in best.items():
                result[f"{name}_{mode}_per_s"] = round(n / seconds, 1)
                result[f"{name}_{mode}_cpu_ms_per_instance"] = round(cpu / n * 1000, 2)
            result[f"ratio_{name}_transcoded_vs_stored"] = round(
                best["stored"][0] / best["transcoded"][0], 3
            )
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
