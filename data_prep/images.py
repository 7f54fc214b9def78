"""Reading the real source images into one convention: 8-bit grayscale ``uint8`` arrays (H, W).

The public COVID sets mix every kind of file a PACS export or a paper figure can produce:
8-bit and 16-bit PNGs in modes L / RGB / RGBA / P, JPEGs (some with an EXIF orientation tag),
and DICOM from the RSNA challenge.  :func:`load_gray` turns each into the same thing:

* EXIF orientation is applied, so the pixels are the way a viewer shows them;
* colour is reduced to luma (ITU-R 601, what PIL's ``convert("L")`` does) — the "colour"
  X-rays are grey images saved as RGB, so this is lossless for them;
* transparency is composited onto black (:data:`ALPHA_BACKGROUND`), the colour of air around
  the body, so transparent padding does not turn into bright frames;
* more than 8 bits (16-bit PNG, 32-bit integer, float, DICOM) is stretched min-to-max onto
  0..255, because such files rarely use their full container range (12-bit data in 16 bits);
* DICOM gets its modality LUT (rescale slope/intercept) and VOI LUT (window) applied, and
  ``MONOCHROME1`` (bright = low attenuation) is inverted so bone is bright everywhere.

Anything unreadable raises :class:`ImageReadError`, a ``ValueError`` that names the file and why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from data_prep.errors import WorkbookError

#: File suffixes treated as DICOM without sniffing (files with other names are sniffed for ``DICM``).
DICOM_SUFFIXES = (".dcm", ".dicom")
#: DICOM Part 10 files carry the magic ``DICM`` after a 128-byte preamble.
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
#: Grey level that transparent pixels are composited onto (0 = black, like air around the body).
ALPHA_BACKGROUND = 0
#: Image suffixes the loader is meant for (used to find images in a folder; loading sniffs content).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".bmp", ".tif", ".tiff")

_U8_MAX = 255


class ImageReadError(WorkbookError, ValueError):
    """An image file could not be read or converted; the message names the file and the reason."""


def load_gray(path: Path | str) -> np.ndarray:
    """Read the image at ``path`` as an 8-bit grayscale array of shape (H, W), dtype ``uint8``.

    Handles PNG/JPEG/other PIL formats in any mode (EXIF orientation applied, colour to luma,
    alpha onto black, high bit depths stretched to 0..255) and DICOM (modality and VOI LUTs,
    ``MONOCHROME1`` inverted).  Raises :class:`ImageReadError` naming the file when it is missing,
    truncated, not an image, or of a kind that cannot be converted.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file {path} does not exist (check the manifest path and the data folder)")
    if _is_dicom(path):
        return _load_dicom(path)
    return _load_pil(path)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        f.seek(DICOM_MAGIC_OFFSET)
        return f.read(len(DICOM_MAGIC)) == DICOM_MAGIC


def _load_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()  # decode now so truncated files fail here, inside the try
            im = ImageOps.exif_transpose(im)
            return _pil_to_gray(im, path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, ImageReadError):
            raise
        raise ImageReadError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


def _pil_to_gray(im: Image.Image, path: Path) -> np.ndarray:
    """Convert a loaded PIL image of any mode to uint8 grayscale."""
    mode = im.mode
    if mode == "P":
        # Palette images may declare a transparent index; expand to RGBA so it is honoured.
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        background = Image.new("RGBA", im.size, (ALPHA_BACKGROUND,) * 3 + (_U8_MAX,))
        im = Image.alpha_composite(background, im.convert("RGBA"))
        mode = im.mode
    if mode in ("L", "RGB", "RGBA", "CMYK", "YCbCr", "1"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        # 16-bit PNG ("I;16", "I;16B"), 32-bit integer ("I") or float ("F"): stretch to 8 bits.
        return stretch_to_uint8(np.asarray(im), path)
    raise ImageReadError(f"image {path} has PIL mode {mode!r}, which this loader does not convert")


def stretch_to_uint8(pixels: np.ndarray, path: Path | str = "<array>") -> np.ndarray:
    """Map ``pixels`` (any numeric dtype, one channel) linearly from its min..max onto 0..255 uint8.

    A constant image maps to zeros.  Raises :class:`ImageReadError` naming ``path`` when the
    array is not 2-D or holds NaN/inf.
    """
    if pixels.ndim != 2:
        raise ImageReadError(f"image {path}: expected one grey channel, got array of shape {pixels.shape}")
    data = pixels.astype(np.float64, copy=False)
    if not np.isfinite(data).all():
        raise ImageReadError(f"image {path} holds NaN or infinite pixel values")
    low, high = float(data.min()), float(data.max())
    if high <= low:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (data - low) * (_U8_MAX / (high - low))
    return np.clip(np.rint(scaled), 0, _U8_MAX).astype(np.uint8)


def _load_dicom(path: Path) -> np.ndarray:
    import pydicom  # imported here: only DICOM users pay for it
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except (pydicom.errors.InvalidDicomError, OSError, ValueError, AttributeError, KeyError) as err:
        raise ImageReadError(f"cannot read DICOM {path}: {type(err).__name__}: {err}") from err
    except (RuntimeError, NotImplementedError) as err:
        # pydicom raises RuntimeError when no installed plugin decodes the transfer syntax.
        raise ImageReadError(
            f"cannot decode the pixel data of DICOM {path} ({err}); for compressed DICOM install a "
            "decoder plugin, e.g. `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`"
        ) from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageReadError(f"DICOM {path} has {frames} frames; a chest radiograph should have one")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        values = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
        gray = stretch_to_uint8(np.asarray(values), path)
        if photometric == "MONOCHROME1":
            gray = _U8_MAX - gray
        return gray
    if pixels.ndim == 3 and pixels.shape[-1] == 3 and pixels.dtype == np.uint8:
        # RGB (pydicom already turns YBR into RGB): reduce to luma like the PNG path.
        return np.asarray(Image.fromarray(pixels, "RGB").convert("L"), dtype=np.uint8)
    raise ImageReadError(
        f"DICOM {path} has PhotometricInterpretation {photometric!r} and pixel shape {pixels.shape}, "
        "which this loader does not convert"
    )
