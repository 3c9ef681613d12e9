"""WADO-RS rendered resources and thumbnails (PS3.18 8.3.5, 10.4) without sockets: a frame
of a stored instance as a JPEG or PNG a browser can show.

Pixels are decoded as for transcoding (``transcode`` to Explicit VR Little Endian when stored
compressed or big endian), then, for grayscale, the Modality LUT (Rescale Slope/Intercept or
the Modality LUT Sequence) and the VOI LUT are applied with pydicom
(``apply_modality_lut``, ``apply_voi_lut``): the window of the ``window`` parameter, else the
instance's first window or VOI LUT, else the frame's own minimum to maximum; MONOCHROME1 is
inverted so that it displays as intended. Palette colour goes through its LUT
(``apply_color_lut``); colour is sent as RGB. The 8-bit result is scaled into ``viewport``
and encoded with Pillow.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from p2pacs.dicom.transcode import UNCOMPRESSED, Plan, transcode
from p2pacs.dicomweb.wado import NotAcceptableError, _media_ranges, _read
from p2pacs.errors import P2PacsError

__all__ = [
    "MEDIA_TYPES",
    "NotAnImageError",
    "RenderParamError",
    "RenderParams",
    "parse_render",
    "render",
]

JPEG, PNG = "image/jpeg", "image/png"
MEDIA_TYPES = (JPEG, PNG)  # the first is the default (PS3.18 8.3.5.1: image/jpeg)
DEFAULT_QUALITY = 90  # JPEG quality when the request does not say (Pillow's own is 75)
THUMBNAIL_SIZE = 128  # pixels: a thumbnail fits in this square unless a viewport is given
MAX_VIEWPORT = 8192  # pixels a side: larger viewports are refused (memory of one request)
_FUNCTIONS = {"linear": "LINEAR", "linear-exact": "LINEAR_EXACT", "sigmoid": "SIGMOID"}
_PARAMS = {"quality", "viewport", "window", "accept"}


class RenderParamError(P2PacsError):
    """A rendering parameter that is malformed or not supported (400 with the reason)."""


class NotAnImageError(P2PacsError):
    """The instance holds no pixel data to render (406: no image representation)."""


@dataclass(frozen=True, slots=True)
class RenderParams:
    media: str  # image/jpeg or image/png
    quality: int = DEFAULT_QUALITY
    viewport: tuple[int, ...] | None = None  # (vw, vh) or (vw, vh, sx, sy, sw, sh)
    window: tuple[float, float, str] | None = None  # (center, width, VOI LUT Function)


def _media(accept: str | None) -> str:
    """The image type to send: the first of ``MEDIA_TYPES`` the Accept header allows."""
    if not accept:
        return MEDIA_TYPES[0]
    for rng in _media_ranges(accept):
        if rng.media in MEDIA_TYPES:
            return rng.media
        if rng.media in ("*/*", "image/*"):
            return MEDIA_TYPES[0]
    raise NotAcceptableError(
        f"rendered resources are served as {' or '.join(MEDIA_TYPES)}, not {accept!r}"
    )


def _ints(name: str, value: str, counts: tuple[int, ...]) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise RenderParamError(f"{name} must be whole numbers separated by commas") from None
    if len(out) not in counts:
        raise RenderParamError(f"{name} takes {' or '.join(map(str, counts))} numbers")
    return out


def parse_render(
    query: Iterable[tuple[str, str]], accept: str | None, *, thumbnail: bool = False
) -> RenderParams:
    """The rendering a request asks for (PS3.18 8.3.5.1): ``accept`` (query parameter, over
    the header), ``quality`` (1-100), ``viewport`` (``vw,vh`` or ``vw,vh,sx,sy,sw,sh``),
    ``window`` (``center,width[,linear|linear-exact|sigmoid]``). A thumbnail takes
    ``viewport`` only. Raises ``RenderParamError`` or ``NotAcceptableError``."""
    params: dict[str, str] = {}
    for key, value in query:
        if key not in _PARAMS or (thumbnail and key not in ("viewport", "accept")):
            raise RenderParamError(f"query parameter {key!r} is not supported here")
        if key in params:
            raise RenderParamError(f"query parameter {key!r} given twice")
        params[key] = value
    media = _media(params.get("accept", accept))
    quality = DEFAULT_QUALITY
    if "quality" in params:
        (quality,) = _ints("quality", params["quality"], (1,))
        if not 1 <= quality <= 100:
            raise RenderParamError("quality must be 1 to 100")
    viewport: tuple[int, ...] | None = (THUMBNAIL_SIZE, THUMBNAIL_SIZE) if thumbnail else None
    if "viewport" in params:
        viewport = _ints("viewport", params["viewport"], (2, 6))
        if not all(1 <= v <= MAX_VIEWPORT for v in viewport[:2]):
            raise RenderParamError(f"viewport width and height must be 1 to {MAX_VIEWPORT}")
        if len(viewport) == 6 and (min(viewport[2:4]) < 0 or min(viewport[4:]) < 1):
            raise RenderParamError("the viewport's source region must lie in the image")
    window = None
    if "window" in params:
        parts = params["window"].split(",")
        if len(parts) not in (2, 3):
            raise RenderParamError("window is center,width[,function]")
        function = _FUNCTIONS.get(parts[2].strip().lower() if len(parts) == 3 else "linear")
        try:
            center, width = float(parts[0]), float(parts[1])
        except ValueError:
            raise RenderParamError("window center and width must be numbers") from None
        if function is None or not width > 0 or not np.isfinite(center + width):
            raise RenderParamError(
                f"window function must be one of {', '.join(_FUNCTIONS)}, width above 0"
            )
        window = (center, width, function)
    return RenderParams(media, quality, viewport, window)


def _frame_array(raw: bytes | memoryview, ts: str, frame: int) -> tuple[np.ndarray, Dataset]:
    """Frame ``frame`` (1-based) as pydicom's ``pixel_array`` gives it, and the dataset."""
    if ts not in UNCOMPRESSED:  # compressed or big endian: decoded as for transcoding
        raw, ts = transcode(raw, ts, Plan(ExplicitVRLittleEndian)), str(ExplicitVRLittleEndian)
    ds = _read(raw, ts, pixels=True)
    if "PixelData" not in ds:
        raise NotAnImageError("the instance has no pixel data to render")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= count:
        raise IndexError(f"frame {frame} out of 1..{count}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = ds.pixel_array
    if count > 1:
        arr = arr[frame - 1]
    return arr, ds


def _voi_source(ds: Dataset, window: tuple[float, float, str] | None) -> Dataset:
    """The elements pydicom's VOI functions read, with the request's window when given."""
    out = Dataset()
    for keyword in (
        "BitsStored", "PixelRepresentation", "PhotometricInterpretation", "RescaleSlope",
        "RescaleIntercept",
        "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
        "VOILUTSequence",
    ):  # fmt: skip
        if keyword in ds:
            out[keyword] = ds[keyword]
    if window is not None:
        out.WindowCenter, out.WindowWidth, out.VOILUTFunction = window
        if "VOILUTSequence" in out:
            del out.VOILUTSequence
    return out


def _grayscale(arr: np.ndarray, ds: Dataset, window: tuple[float, float, str] | None) -> Any:
    """8-bit display values of a grayscale frame."""
    values = apply_modality_lut(arr, ds).astype(np.float64)
    voi = _voi_source(ds, window)
    has_voi = "VOILUTSequence" in voi or ("WindowCenter" in voi and "WindowWidth" in voi)
    if has_voi:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shown = apply_voi_lut(values.copy(), voi, index=0)
            # the VOI's output range: where it sends values far below and above the window
            ends = apply_voi_lut(np.array([-1e12, 1e12]), voi, index=0)
        lo, hi = float(np.min(ends)), float(np.max(ends))
    else:
        shown = values
    if not has_voi or not hi > lo:
        lo, hi = float(np.min(values)), float(np.max(values))
    scaled = np.clip((np.asarray(shown, dtype=np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * 255).astype(np.uint8)


def _colour(arr: np.ndarray, ds: Dataset) -> Any:
    """8-bit RGB of a colour frame (palette colour through its LUT)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
    if bits > 8:
        arr = np.rint(arr.astype(np.float64) * (255 / (2**bits - 1)))
    return np.clip(arr, 0, 255).astype(np.uint8)


def render(raw: bytes | memoryview, ts: str, frame: int, params: RenderParams) -> bytes:
    """Frame ``frame`` (1-based) of the dataset ``raw`` (stored in ``ts``) encoded as
    ``params.media``. Raises ``NotAnImageError``, ``IndexError`` (no such frame),
    ``TranscodeError`` (pixels that cannot be decoded) or ``RenderParamError``."""
    arr, ds = _frame_array(raw, ts, frame)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples == 1 and photometric != "PALETTE COLOR":
        image = Image.fromarray(_grayscale(arr, ds, params.window), mode="L")
    elif samples == 3 or photometric == "PALETTE COLOR":
        rgb = _colour(arr, ds)
        image = Image.fromarray(rgb[..., :3], mode="RGB")
    else:
        raise NotAnImageError(f"{samples} samples per pixel cannot be rendered")
    image = _fit(image, params.viewport)
    out = io.BytesIO()
    if params.media == JPEG:
        image.save(out, format="JPEG", quality=params.quality)
    else:
        image.save(out, format="PNG")
    return out.getvalue()


def _fit(image: Image.Image, viewport: tuple[int, ...] | None) -> Image.Image:
    """The image (or the viewport's source region of it) scaled to fit the viewport, its
    aspect ratio kept (PS3.18 8.3.5.1.3)."""
    if viewport is None:
        return image
    if len(viewport) == 6:
        sx, sy, sw, sh = viewport[2:]
        if sx >= image.width or sy >= image.height:
            raise RenderParamError("the viewport's source region lies outside the image")
        image = image.crop((sx, sy, min(sx + sw, image.width), min(sy + sh, image.height)))
    return ImageOps.contain(image, (viewport[0], viewport[1]))
