"""Every kind of image file the sources hold, read to one 8-bit grey convention."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from data_prep.images import IMAGE_SUFFIXES, ImageReadError, load_gray, stretch_to_uint8

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def ramp(h: int = 16, w: int = 24) -> np.ndarray:
    """A uint8 image with distinct rows and columns, so orientation mistakes show."""
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 7 + y * 3) % 256).astype(np.uint8)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, bits_stored: int, **extra) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.set_pixel_data(pixels, photometric, bits_stored)
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- generated fixtures


def test_8bit_gray_png_round_trips(tmp_path: Path) -> None:
    img = ramp()
    Image.fromarray(img, "L").save(tmp_path / "a.png")
    out = load_gray(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)


def test_16bit_png_is_stretched_to_full_8bit_range(tmp_path: Path) -> None:
    # 12-bit data in a 16-bit container, as CR exports often are.
    raw = (np.arange(16 * 24, dtype=np.uint16).reshape(16, 24) * 10 + 100).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode.startswith("I")
    out = load_gray(tmp_path / "b.png")
    assert out.dtype == np.uint8 and out.shape == raw.shape
    assert out.min() == 0 and out.max() == 255
    flat = out.ravel()
    assert np.all(np.diff(flat.astype(int)) >= 0)  # order of grey levels is kept
    expected = np.rint((raw.astype(float) - 100) / (raw.max() - 100) * 255)
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_rgb_png_of_a_grey_image_is_lossless(tmp_path: Path) -> None:
    img = ramp()
    Image.fromarray(np.stack([img] * 3, axis=-1), "RGB").save(tmp_path / "c.png")
    np.testing.assert_array_equal(load_gray(tmp_path / "c.png"), img)


def test_rgb_colour_uses_luma(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 1] = 200  # pure green
    Image.fromarray(rgb, "RGB").save(tmp_path / "g.png")
    out = load_gray(tmp_path / "g.png")
    assert np.all(np.abs(out.astype(int) - round(0.587 * 200)) <= 1)


def test_rgba_transparent_pixels_become_black(tmp_path: Path) -> None:
    img = ramp()
    rgba = np.dstack([img, img, img, np.full_like(img, 255)])
    rgba[:, :5, 3] = 0  # transparent left band over bright pixels
    rgba[:, :5, :3] = 250
    rgba[:, 5:8, 3] = 128  # half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "d.png")
    out = load_gray(tmp_path / "d.png")
    assert np.all(out[:, :5] == 0)
    np.testing.assert_array_equal(out[:, 8:], img[:, 8:])
    half = out[:, 5:8].astype(int)
    assert np.all(np.abs(half - img[:, 5:8].astype(int) * 128 / 255) <= 1)


def test_la_png(tmp_path: Path) -> None:
    img = ramp()
    Image.fromarray(np.dstack([img, np.full_like(img, 255)]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_gray(tmp_path / "la.png"), img)


def test_palette_png(tmp_path: Path) -> None:
    img = ramp()
    Image.fromarray(img, "L").convert("P").save(tmp_path / "e.png")
    assert Image.open(tmp_path / "e.png").mode == "P"
    np.testing.assert_array_equal(load_gray(tmp_path / "e.png"), img)


def test_palette_png_with_transparent_index(tmp_path: Path) -> None:
    pal = Image.new("P", (6, 6), 1)
    pal.putpalette([255, 255, 255, 90, 90, 90] + [0, 0, 0] * 254)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "t.png", transparency=0)
    out = load_gray(tmp_path / "t.png")
    assert out[0, 0] == 0  # the transparent white index is composited onto black
    assert out[3, 3] == 90


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = np.zeros((20, 40), np.uint8)
    img[:, :10] = 255  # bright band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(img, "L").save(tmp_path / "f.jpg", exif=exif, quality=95)
    out = load_gray(tmp_path / "f.jpg")
    assert out.shape == (40, 20)  # displayed portrait
    assert out[:8, :].mean() > 200 and out[-8:, :].mean() < 50  # the band is now on top


def test_jpeg_without_exif(tmp_path: Path) -> None:
    img = ramp(32, 32)
    Image.fromarray(img, "L").save(tmp_path / "h.JPG", quality=95)
    out = load_gray(tmp_path / "h.JPG")
    assert out.shape == (32, 32)
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 3


def test_dicom_monochrome2_and_monochrome1_are_inverses(tmp_path: Path) -> None:
    raw = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 60).astype(np.uint16)  # 12-bit values
    m2 = load_gray(write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", 12))
    m1 = load_gray(write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", 12))
    assert m2[0, 0] == 0 and m2[-1, -1] == 255
    np.testing.assert_array_equal(m1, 255 - m2)


def test_dicom_without_suffix_is_sniffed(tmp_path: Path) -> None:
    raw = ramp(8, 8)
    path = write_dicom(tmp_path / "rsna-image", raw, "MONOCHROME2", 8)
    out = load_gray(path)
    np.testing.assert_array_equal(out, stretch_to_uint8(raw))


def test_dicom_rescale_and_window_are_applied(tmp_path: Path) -> None:
    raw = np.arange(100, dtype=np.uint16).reshape(10, 10) * 40  # 0..3960
    # Modality LUT: value = raw - 1000; window 500 +/- 500 clips everything below 0 and above 1000.
    path = write_dicom(tmp_path / "w.dcm", raw, "MONOCHROME2", 12, RescaleSlope=1, RescaleIntercept=-1000,
                       WindowCenter=500, WindowWidth=1000)
    out = load_gray(path)
    values = raw.astype(int) - 1000
    assert np.all(out[values <= 0] == 0)
    assert np.all(out[values >= 1000] == 255)
    inside = (values > 50) & (values < 950)
    assert np.all((out[inside] > 0) & (out[inside] < 255))


def test_compressed_dicom_without_decoder_names_the_fix(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "c.dcm", ramp(8, 8), "MONOCHROME2", 8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8not-a-real-jpeg\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"(?s)c\.dcm.*pip install"):
        load_gray(path)


def test_jpeg_compressed_dicom_decodes(tmp_path: Path) -> None:
    # RSNA-style 8-bit MONOCHROME2 with JPEG baseline pixel data, decoded by pydicom's Pillow plugin.
    img = ramp(32, 32)
    Image.fromarray(img, "L").save(tmp_path / "frame.jpg", quality=95)
    path = write_dicom(tmp_path / "j.dcm", img, "MONOCHROME2", 8)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = pydicom.encaps.encapsulate([(tmp_path / "frame.jpg").read_bytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    out = load_gray(path)
    assert out.shape == img.shape
    assert np.abs(out.astype(int) - stretch_to_uint8(img).astype(int)).mean() < 3


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"])
def test_unreadable_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken.png"):
        load_gray(path)


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    Image.fromarray(ramp(64, 64), "L").save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_gray(tmp_path / "cut.png")


def test_missing_file_is_an_image_read_error(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="nope.png.*does not exist"):
        load_gray(tmp_path / "nope.png")
    assert issubclass(ImageReadError, ValueError)


def test_stretch_constant_and_nan() -> None:
    np.testing.assert_array_equal(stretch_to_uint8(np.full((3, 3), 7.0)), np.zeros((3, 3), np.uint8))
    with pytest.raises(ImageReadError, match="NaN"):
        stretch_to_uint8(np.array([[1.0, np.nan]]))


# --------------------------------------------------------------------------- real mirror files

def _first(data_dir: Path, folder: str, pattern: str, fmt: str, mode: str) -> Path:
    for path in sorted((data_dir / folder).glob(pattern)):
        with Image.open(path) as im:
            if im.format == fmt and im.mode == mode:
                return path
    pytest.fail(f"no {fmt} {mode} file matching {pattern} in {folder}")


@pytest.mark.parametrize(
    "folder, pattern, fmt, mode",
    [
        ("nih-cxr14-subset/images", "*.png", "PNG", "L"),
        ("nih-cxr14-subset/images", "*.png", "PNG", "RGBA"),
        ("Actualmed-COVID-chestxray-dataset/images", "*.png", "PNG", "RGB"),
        ("covid-chestxray-dataset/images", "*.jp*g", "JPEG", "RGB"),
        ("covid-chestxray-dataset/images", "*.jp*g", "JPEG", "L"),
        ("covid-chestxray-dataset/images", "*.png", "PNG", "RGBA"),
        ("Figure1-COVID-chestxray-dataset/images", "*.jpg", "JPEG", "L"),
        ("Figure1-COVID-chestxray-dataset/images", "*.png", "PNG", "L"),
    ],
)
def test_real_file_kinds(data_dir: Path, folder: str, pattern: str, fmt: str, mode: str) -> None:
    path = _first(data_dir, folder, pattern, fmt, mode)
    out = load_gray(path)
    with Image.open(path) as im:
        assert out.shape == (im.height, im.width)
        reference = np.asarray(im.convert("L"))
    assert out.dtype == np.uint8
    assert out.std() > 10  # a radiograph, not a blank
    if mode in ("L", "RGB"):
        np.testing.assert_array_equal(out, reference)


def test_real_rgba_with_transparency_goes_black(data_dir: Path) -> None:
    path = data_dir / "covid-chestxray-dataset/images/pneumocystis-pneumonia-2-L.png"
    rgba = np.asarray(Image.open(path))
    transparent = rgba[..., 3] == 0
    assert transparent.any()
    out = load_gray(path)
    assert np.all(out[transparent] == 0)


def test_real_upper_case_extension(data_dir: Path) -> None:
    upper = [p for p in (data_dir / "covid-chestxray-dataset/images").iterdir() if p.suffix in (".JPG", ".PNG")]
    assert upper, "the mirror should hold upper-case extensions"
    for path in upper:
        assert load_gray(path).ndim == 2


@pytest.mark.slow
def test_every_real_image_loads(data_dir: Path) -> None:
    paths = [p for p in data_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and "annotations" not in p.parts]
    assert len(paths) > 1500
    for path in paths:
        out = load_gray(path)
        assert out.dtype == np.uint8 and out.ndim == 2 and min(out.shape) > 16, path
