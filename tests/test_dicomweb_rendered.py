"""Rendered resources and thumbnails (p2pacs/dicomweb/rendered.py): pydicom's test files (CT,
MR, RGB, palette, compressed) rendered to JPEG and PNG, decoded again and checked for size
and content; then over HTTP (the app on 127.0.0.1 port 0) for media types and errors."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pydicom
import pytest
from aiohttp.test_utils import TestServer
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from p2pacs.archive import Archive
from p2pacs.dicom import split_part10
from p2pacs.dicomweb import dicomweb_app
from p2pacs.dicomweb.rendered import (
    NotAnImageError,
    RenderParamError,
    parse_render,
    render,
)
from p2pacs.dicomweb.wado import NotAcceptableError
from p2pacs.errors import TranscodeError


def _file(files: list[Path], name: str) -> Path:
    return next(p for p in files if p.name == name)


def _render(
    path: Path, query: list[tuple[str, str]], accept: str = "image/png", frame: int = 1
) -> tuple[Image.Image, np.ndarray]:
    part = split_part10(path.read_bytes())
    body = render(part.dataset, part.transfer_syntax, frame, parse_render(query, accept))
    image = Image.open(io.BytesIO(body))
    return image, np.asarray(image)


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("CT_small.dcm", "L"),  # 16-bit signed, rescaled, explicit VR
        ("MR_small.dcm", "L"),
        ("MR_small_bigendian.dcm", "L"),  # converted from big endian first
        ("MR_small_jp2klossless.dcm", "L"),  # JPEG 2000 decoded (OpenJPEG)
        ("MR_small_jpeg_ls_lossless.dcm", "L"),  # JPEG-LS (CharLS)
        ("liver_1frame.dcm", "L"),
        ("SC_rgb_jpeg_gdcm.dcm", "RGB"),  # JPEG Baseline (GDCM)
        ("SC_rgb_rle_2frame.dcm", "RGB"),  # RLE, two frames
        ("SC_rgb_rle_16bit.dcm", "RGB"),  # 16 bits a sample, scaled to 8
        ("examples_palette.dcm", "RGB"),  # through its palette
        ("SC_ybr_full_422_uncompressed.dcm", "RGB"),
    ],
)
def test_renders_decode_to_the_image_size_and_are_not_blank(
    pydicom_all_files: list[Path], name: str, mode: str
) -> None:
    path = _file(pydicom_all_files, name)
    ds = pydicom.dcmread(path)
    for accept, fmt in (("image/jpeg", "JPEG"), ("image/png", "PNG")):
        image, pixels = _render(path, [], accept)
        assert (image.format, image.mode) == (fmt, mode)
        assert image.size == (ds.Columns, ds.Rows)
        assert pixels.std() > 5 and pixels.min() < pixels.max()  # an image, not one colour


def test_rgb_png_is_the_stored_pixels(pydicom_all_files: list[Path]) -> None:
    path = _file(pydicom_all_files, "SC_rgb_rle_2frame.dcm")
    arr = pydicom.dcmread(path).pixel_array
    for frame in (1, 2):
        _, pixels = _render(path, [], frame=frame)
        assert np.array_equal(pixels, arr[frame - 1])
    with pytest.raises(IndexError, match=r"frame 3 out of 1\.\.2"):
        _render(path, [], frame=3)


def test_window_parameter_sets_black_and_white(pydicom_all_files: list[Path]) -> None:
    path = _file(pydicom_all_files, "CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    center, width = float(np.median(hu)), 100.0
    _, pixels = _render(path, [("window", f"{center},{width},linear")])
    below, above = hu < center - width / 2 - 1, hu > center + width / 2
    assert below.any() and above.any()
    assert (pixels[below] == 0).all() and (pixels[above] == 255).all()
    _, default = _render(path, [])  # the instance's own window: a different picture
    assert not np.array_equal(default, pixels)


def test_monochrome1_is_inverted(pydicom_all_files: list[Path], tmp_path: Path) -> None:
    path = _file(pydicom_all_files, "MR_small.dcm")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted = tmp_path / "m1.dcm"
    ds.save_as(inverted, enforce_file_format=True)
    _, m2 = _render(path, [])
    _, m1 = _render(inverted, [])
    assert np.array_equal(m1.astype(int), 255 - m2.astype(int))


def test_viewport_scales_and_crops(pydicom_all_files: list[Path]) -> None:
    path = _file(pydicom_all_files, "examples_palette.dcm")  # 800 x 350
    image, _ = _render(path, [("viewport", "200,200")])
    assert image.size == (200, 88)  # aspect kept
    image, _ = _render(path, [("viewport", "100,100,0,0,50,50")])
    assert image.size == (100, 100)  # a 50 x 50 region scaled up
    with pytest.raises(RenderParamError, match="outside the image"):
        _render(path, [("viewport", "10,10,900,0,5,5")])


def test_parameters_and_media_types() -> None:
    assert parse_render([], None).media == "image/jpeg"
    assert parse_render([], "image/*").media == "image/jpeg"
    assert parse_render([], "image/gif, image/png;q=0.9, image/jpeg;q=0.5").media == "image/png"
    assert parse_render([("accept", "image/png")], "image/jpeg").media == "image/png"
    thumb = parse_render([], None, thumbnail=True)
    assert thumb.viewport == (128, 128)
    p = parse_render([("quality", "40"), ("window", "40,400,SIGMOID")], None)
    assert (p.quality, p.window) == (40, (40.0, 400.0, "SIGMOID"))
    with pytest.raises(NotAcceptableError):
        parse_render([], "image/gif")
    for query, why in [
        ([("quality", "0")], "1 to 100"),
        ([("quality", "x")], "whole numbers"),
        ([("viewport", "10")], "takes 2 or 6"),
        ([("viewport", "0,10")], "1 to 8192"),
        ([("window", "40")], "center,width"),
        ([("window", "40,0")], "width above 0"),
        ([("window", "40,10,cubic")], "must be one of"),
        ([("annotation", "patient")], "not supported"),
        ([("quality", "5"), ("quality", "6")], "given twice"),
    ]:
        with pytest.raises(RenderParamError, match=why):
            parse_render(query, None)
    with pytest.raises(RenderParamError, match="not supported"):
        parse_render([("window", "1,2")], None, thumbnail=True)


def test_no_pixels_or_no_decoder_cannot_be_rendered(pydicom_all_files: list[Path]) -> None:
    with pytest.raises(NotAnImageError):
        _render(_file(pydicom_all_files, "rtplan.dcm"), [])
    with pytest.raises(TranscodeError):  # 12-bit JPEG Extended: no decoder here
        _render(_file(pydicom_all_files, "JPEG-lossy.dcm"), [])


@dataclass
class Served:
    url: str
    heads: dict[str, Dataset]  # file name -> header


@pytest.fixture
async def served(tmp_path: Path, pydicom_all_files: list[Path]) -> AsyncIterator[Served]:
    names = ("CT_small.dcm", "SC_rgb_rle_2frame.dcm", "rtplan.dcm", "JPEG-lossy.dcm")
    archive = Archive(tmp_path / "db", map_size=1 << 28, sync=False)
    heads = {}
    for name in names:
        path = _file(pydicom_all_files, name)
        archive.import_file(path)
        heads[name] = pydicom.dcmread(path, stop_before_pixels=True)
    server = TestServer(dicomweb_app(archive, warm=False), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Served(str(server.make_url("")).rstrip("/"), heads)
    finally:
        await server.close()
        archive.close()


def _instance(served: Served, name: str) -> str:
    h = served.heads[name]
    return (
        f"{served.url}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
        f"/instances/{h.SOPInstanceUID}"
    )


async def test_rendered_and_thumbnail_over_http(served: Served) -> None:
    ct, rgb = _instance(served, "CT_small.dcm"), _instance(served, "SC_rgb_rle_2frame.dcm")
    cases = [
        (f"{ct}/rendered", None, 200, "image/jpeg", (128, 128)),
        (f"{ct}/rendered?viewport=64,64&quality=50", "image/png", 200, "image/png", (64, 64)),
        (f"{rgb}/frames/2/rendered", "image/png", 200, "image/png", (100, 100)),
        (f"{rgb}/thumbnail", None, 200, "image/jpeg", (128, 128)),  # scaled to fit 128 x 128
        (f"{ct}/thumbnail?viewport=32,32", "image/*", 200, "image/jpeg", (32, 32)),
    ]
    async with aiohttp.ClientSession() as session:
        for url, accept, status, ctype, size in cases:
            headers = {"Accept": accept} if accept else {}
            async with session.get(url, headers=headers) as r:
                assert (r.status, r.content_type) == (status, ctype), url
                image = Image.open(io.BytesIO(await r.read()))
                assert image.size == size and np.asarray(image).std() > 5, url
        errors = [
            (f"{ct}/rendered", "image/gif", 406),
            (f"{ct}/rendered?quality=101", None, 400),
            (f"{ct}/rendered?annotation=patient", None, 400),
            (f"{ct}/thumbnail?quality=50", None, 400),
            (f"{rgb}/frames/1,2/rendered", None, 400),
            (f"{rgb}/frames/3/rendered", None, 404),
            (f"{_instance(served, 'rtplan.dcm')}/rendered", None, 406),  # no pixel data
            (f"{_instance(served, 'JPEG-lossy.dcm')}/thumbnail", None, 406),  # no decoder
            (f"{served.url}/studies/1.2/series/3/instances/4/rendered", None, 404),
        ]
        for url, accept, status in errors:
            headers = {"Accept": accept} if accept else {}
            async with session.get(url, headers=headers) as r:
                assert r.status == status, (url, await r.text())
