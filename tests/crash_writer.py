"""Subprocess for the kill -9 test: writes until killed, printing each acknowledged write.

Usage: python crash_writer.py (blobs|archive) DB_DIR SEED
Each line printed (and flushed) names something whose write returned success: after the kill
it must be present and intact.
"""

from __future__ import annotations

import random
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from p2pacs.archive import Archive
from p2pacs.store import BlobStore, SiteDB, hash_bytes

CHUNK = 64 * 1024
MAX_WRITES = 100_000  # bound on the loop; the test kills the writer long before


def run(one: Callable[[int], str]) -> None:
    """Keep a few writes in flight (so commits group) and print each one as it is acknowledged."""
    with ThreadPoolExecutor(4) as pool:
        window: deque[Future[str]] = deque()
        for i in range(MAX_WRITES):
            window.append(pool.submit(one, i))
            if len(window) >= 8:
                print(window.popleft().result(), flush=True)
        while window:
            print(window.popleft().result(), flush=True)


def blobs(path: Path, seed: int) -> None:
    db = SiteDB(path)
    store = BlobStore(db, chunk_size=CHUNK)
    rng = random.Random(seed)

    def one(i: int) -> str:
        data = rng.randbytes(rng.choice([100, 5_000, CHUNK + 1, 4 * CHUNK + 3, 20 * CHUNK]))
        if i % 3 == 0:
            step = 7_000
            return store.put_stream(
                (data[j : j + step] for j in range(0, len(data), step)), hash_bytes(data)
            )
        return store.put(data)

    run(one)


def archive(path: Path, seed: int) -> None:
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    arch = Archive(path)
    rng = random.Random(seed)
    study = generate_uid(prefix=None, entropy_srcs=[str(seed)])

    def one(i: int) -> str:
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(seed), str(i)])
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(seed), str(i % 3)])
        ds.PatientID = f"CRASH{seed}"
        ds.Modality = "OT"
        ds.BitsAllocated = 8
        ds.PixelData = rng.randbytes(rng.choice([1_000, 200_000]))
        ds.set_original_encoding(False, True)
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        write_dataset(buf, ds)
        return arch.ingest(buf.getvalue(), ExplicitVRLittleEndian).sop_uid

    run(one)


if __name__ == "__main__":
    {"blobs": blobs, "archive": archive}[sys.argv[1]](Path(sys.argv[2]), int(sys.argv[3]))
