"""Sample DICOM data: pydicom's own test files and deterministic generated instances.

The demo, the tests and the benchmarks use real files: the ~150 instances that ship inside the
pydicom wheel (found by globbing its ``data/test_files`` folder: ``get_testdata_files("*")``
may try to download more and hang offline), plus CT/MR instances generated here with realistic
patient, study and series attributes, 16-bit pixels, explicit and implicit VR, and optionally a
multi-frame instance larger than 8 MiB.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = ["generate_bench_instances", "generate_instances", "pydicom_test_files"]

_FAMILY = ["Smith", "Garcia", "Müller", "Rossi", "Dubois", "Novak", "Silva", "Kowalski"]
_GIVEN = ["Anna", "Jean", "Maria", "Piotr", "Lucia", "Omar", "Ines", "Karl"]
_DESCRIPTIONS = {
    "CT": ["CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS", "CT HEAD"],
    "MR": ["MR BRAIN W/WO", "MR KNEE LEFT", "MR LUMBAR SPINE"],
}


def pydicom_test_files() -> list[Path]:
    """Every file in pydicom's bundled test data folder (DICOM or not: callers filter)."""
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _uid(rng: random.Random) -> str:
    return generate_uid(entropy_srcs=[str(rng.getrandbits(128))])


def _instance(
    rng: random.Random,
    *,
    patient: tuple[str, str, str, str],
    study: dict[str, str],
    series: dict[str, str],
    number: int,
    rows: int,
    columns: int,
    frames: int,
    implicit: bool,
) -> Dataset:
    modality = series["Modality"]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = _uid(rng)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient
    for key, value in {**study, **series}.items():
        setattr(ds, key, value)
    ds.InstanceNumber = number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ContentDate, ds.ContentTime = study["StudyDate"], study["StudyTime"]
    ds.SliceThickness = "1.25"
    ds.ImagePositionPatient = ["0", "0", str(number * 1.25)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = ["0.7", "0.7"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope = "-1024", "1"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = rng.randbytes(rows * columns * 2 * max(frames, 1))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


def generate_instances(
    out_dir: Path,
    *,
    studies: int = 3,
    series_per_study: int = 2,
    instances_per_series: int = 4,
    rows: int = 512,
    columns: int = 512,
    seed: int = 0,
    implicit_vr_every: int = 3,
    multiframe_frames: int = 0,
) -> list[Path]:
    """Write Part-10 CT/MR files (deterministic for a seed) and return their paths.

    Every ``implicit_vr_every``-th instance is Implicit VR Little Endian, the rest Explicit.
    With ``multiframe_frames`` > 0 the first study gets one extra multi-frame instance.
    """
    rng = random.Random(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    count = 0
    base = dt.date(2026, 11, 24)
    for s in range(studies):
        modality = "CT" if s % 2 == 0 else "MR"
        patient = (
            f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}",
            f"P{seed:02d}{s:04d}",
            f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            rng.choice(["F", "M", "O"]),
        )
        day = base - dt.timedelta(days=rng.randint(0, 3650) if s else 0)
        study = {
            "StudyInstanceUID": _uid(rng),
            "StudyDate": day.strftime("%Y%m%d"),
            "StudyTime": f"{rng.randint(7, 19):02d}{rng.randint(0, 59):02d}00",
            "AccessionNumber": f"A{seed}{s:06d}",
            "StudyID": str(s + 1),
            "StudyDescription": rng.choice(_DESCRIPTIONS[modality]),
            "ReferringPhysicianName": f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}^^Dr",
        }
        for r in range(series_per_study):
            series = {
                "SeriesInstanceUID": _uid(rng),
                "Modality": modality,
                "SeriesNumber": str(r + 1),
                "SeriesDescription": f"{modality} series {r + 1}",
            }
            extra = 1 if multiframe_frames > 0 and s == 0 and r == 0 else 0
            for i in range(instances_per_series + extra):
                frames = multiframe_frames if i == instances_per_series else 1
                implicit = implicit_vr_every > 0 and count % implicit_vr_every == 0
                ds = _instance(
                    rng, patient=patient, study=study, series=series, number=i + 1,
                    rows=rows, columns=columns, frames=frames, implicit=implicit,
                )  # fmt: skip
                path = out_dir / f"{count:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
                count += 1
    return paths


def generate_bench_instances(out_dir: Path, n: int, *, seed: int = 0) -> list[Path]:
    """``n`` CT instances of ~0.5 MB (512x512, 16-bit), 100 per study."""
    per_series = 50
    studies = max(1, (n + 2 * per_series - 1) // (2 * per_series))
    paths = generate_instances(
        out_dir,
        studies=studies,
        series_per_study=2,
        instances_per_series=per_series,
        seed=seed,
        implicit_vr_every=0,
    )
    for extra in paths[n:]:
        extra.unlink()
    return paths[:n]
