"""A bare pynetdicom Storage SCP for the ingest benchmark: writes each dataset to a file.

Run as ``python bench/_pynetdicom_scp.py OUT_DIR PORT``; prints ``ready`` once listening. Its
handler only writes ``event.encoded_dataset()`` (no fsync), with ``maximum_pdu_size = 0`` and
the allocator tuning and DUL poll interval p2pacs uses: the best pynetdicom can do, the baseline
for the p2pacs gateway built on it.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

from p2pacs.allocator import tune_allocator
from p2pacs.const import DUL_POLL_DELAY


def main() -> None:
    tune_allocator()  # as p2pacs processes do, so the baseline is pynetdicom at its best
    out, port = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    count = 0

    def on_store(event: Any) -> int:
        nonlocal count
        count += 1
        (out / f"{count:06d}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    def nodelay(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # the same DUL poll interval as the gateway, so the baseline is pynetdicom at its best
        event.assoc.dul._run_loop_delay = DUL_POLL_DELAY

    ae = AE(ae_title="PYNETDICOM")
    ae.maximum_pdu_size = 0
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, nodelay)],
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait(3600)
    if server is not None:
        server.shutdown()


if __name__ == "__main__":
    main()
