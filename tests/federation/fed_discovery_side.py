"""One side of the cross-namespace discovery test: announce a site, browse, report as JSON.

Run inside a network namespace: ``python fed_discovery_side.py --site DIR --host IP
--expect NAME``. Prints one JSON line ``{"found": [...]}`` once a site named NAME was
discovered (or ``--timeout`` passed), then keeps announcing until stdin closes (bounded by
``--timeout`` too), so the other side can still find it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
import time
from pathlib import Path

from p2pacs.discovery import Discovery
from p2pacs.federation.identity import load_identity
from p2pacs.site import Site


async def run(args: argparse.Namespace) -> int:
    identity, federation = load_identity(Site.open(Path(args.site)))
    disco = Discovery(
        identity,
        federation,
        host=args.host,
        dht_port=11190,
        transfer_port=11180,
        dicom_port=11112,
        ae_title="SIDE",
        interfaces=[args.host],
    )
    deadline = time.monotonic() + args.timeout
    await disco.start()
    try:
        while time.monotonic() < deadline:
            if any(s.name == args.expect for s in disco.found()):
                break
            await asyncio.sleep(0.1)
        found = [
            {"name": s.name, "site_id": s.site_id.hex(), "host": s.host, "xfer": s.transfer_port}
            for s in disco.found()
        ]
        print(json.dumps({"site": identity.name, "found": found}), flush=True)
        loop = asyncio.get_running_loop()
        closed = asyncio.Event()

        def watch_stdin() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(closed.set)

        threading.Thread(target=watch_stdin, daemon=True).start()
        remaining = max(deadline - time.monotonic(), 1.0)
        with contextlib.suppress(TimeoutError):  # keep announcing until our stdin closes
            await asyncio.wait_for(closed.wait(), remaining)
    finally:
        await disco.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--expect", required=True)
    parser.add_argument("--timeout", type=float, default=20.0)
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
