"""DICOM decoding (built with pydicom at test time): rescale, VOI window, MONOCHROME1, 16-bit, no pixels,
multi-frame, broken rescale/window headers."""
from __future__ import annotations

import io
import random
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxr.data.dataset import DataCheckError, load_standardized
from cxr.data.decode import PIXEL_DATA_TAG, ImageDecodeError, decode_image, to_uint8
from cxr.data.preprocess import Preprocessing


def make_dicom(pixels: np.ndarray | None, photometric: str = "MONOCHROME2", slope: float | None = None,
               intercept: float | None = None, window: tuple[float, float] | None = None,
               rows: int | None = None, columns: int | None = None, frames: int = 1,
               header: dict[int, str] | None = None) -> bytes:
    """A minimal Secondary Capture DICOM file; `pixels=None` leaves out the pixel data. With `frames` > 1,
    `pixels` is (frames, rows, columns[, 3]); an RGB image has a trailing axis of 3 samples. `header` holds
    decimal-string (DS) elements written as given, valid or not."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "TEST"
    rgb = photometric == "RGB"
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PhotometricInterpretation = photometric
    shape = pixels.shape[frames > 1:] if pixels is not None else (rows or 64, columns or 64)
    ds.Rows, ds.Columns = rows or shape[0], columns or shape[1]
    bits = 16 if pixels is None or pixels.dtype != np.uint8 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for tag, value in (header or {}).items():  # raw bytes: pydicom would refuse to store a bad value
        raw = value.encode() + b" " * (len(value) % 2)
        ds[tag] = RawDataElement(Tag(tag), "DS", len(raw), raw, 0, True, True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def gradient16(rows: int = 80, cols: int = 60) -> np.ndarray:
    """A 16-bit image using ~12 bits, with structure in both directions."""
    y, x = np.mgrid[0:rows, 0:cols]
    return (x * 40 + y * 17).astype(np.uint16)


def test_monochrome2_16bit_scales_to_full_uint8_range():
    pixels = gradient16()
    gray = decode_image(make_dicom(pixels))
    assert gray.dtype == np.uint8 and gray.shape == pixels.shape
    assert gray.min() == 0 and gray.max() == 255
    np.testing.assert_array_equal(gray, to_uint8(pixels))


def test_monochrome1_is_inverted():
    pixels = gradient16()
    mono2 = decode_image(make_dicom(pixels, "MONOCHROME2"))
    mono1 = decode_image(make_dicom(pixels, "MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    assert mono1[0, 0] == 255  # lowest stored value is white in MONOCHROME1


def test_voi_window_clips_outside_values():
    pixels = gradient16()
    center, width = 1500.0, 1000.0
    gray = decode_image(make_dicom(pixels, window=(center, width)))
    stored = pixels.astype(float)
    assert np.all(gray[stored <= center - width / 2] == 0)
    assert np.all(gray[stored >= center + width / 2] == 255)
    inside = (stored > center - width / 2 + 20) & (stored < center + width / 2 - 20)
    assert inside.any() and np.all((gray[inside] > 0) & (gray[inside] < 255))


def test_rescale_slope_intercept_applied_before_window():
    pixels = gradient16()
    # Modality values = 2 * stored - 1000; a window on modality values only makes sense after rescale.
    gray = decode_image(make_dicom(pixels, slope=2.0, intercept=-1000.0, window=(1000.0, 1000.0)))
    modality = pixels.astype(float) * 2 - 1000
    assert np.all(gray[modality <= 500] == 0)
    assert np.all(gray[modality >= 1500] == 255)


def test_dicom_without_pixels_has_its_own_code():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(make_dicom(None))
    assert info.value.code == "dicom_without_pixels"


def test_dicom_cut_before_its_pixels_is_not_called_only_a_dicom_without_pixels():
    """The file reads as a whole header: the message has to name the cut as a possible cause."""
    data = make_dicom(np.zeros((8, 8), np.uint16))
    with pytest.raises(ImageDecodeError, match="cut short before its pixels") as info:
        decode_image(data[:data.find(PIXEL_DATA_TAG)])
    assert info.value.code == "dicom_without_pixels"


def test_dicom_over_pixel_limit_refused_from_header():
    # The header claims 60000 x 60000; the (tiny) pixel data is never decoded.
    data = make_dicom(np.zeros((4, 4), np.uint16), rows=60_000, columns=60_000)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=1_000_000)
    assert info.value.code == "image_too_large"


def test_multiframe_decodes_the_first_frame_only():
    frames = np.stack([gradient16(), np.zeros((80, 60), np.uint16), np.full((80, 60), 4000, np.uint16)])
    np.testing.assert_array_equal(decode_image(make_dicom(frames, frames=3)), to_uint8(frames[0]))


def test_multiframe_rgb_gives_one_grey_image():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    gray = decode_image(make_dicom(frames, "RGB", frames=2))
    assert gray.shape == (32, 48) and gray.dtype == np.uint8
    np.testing.assert_array_equal(gray, to_uint8(frames[0].mean(axis=-1)))


@pytest.mark.parametrize("header", [
    {0x00281050: "1000", 0x00281051: "0"},    # Window Width 0
    {0x00281050: "abc", 0x00281051: "100"},   # Window Center not a number
    {0x00281053: "1", 0x00281052: "xyz"},     # Rescale Intercept not a number
], ids=["window-width-0", "window-center-text", "rescale-intercept-text"])
def test_broken_rescale_or_window_header_is_a_decode_error(header):
    with pytest.raises(ImageDecodeError, match="rescale/window") as info:
        decode_image(make_dicom(gradient16(), header=header))
    assert info.value.code == "invalid_image"


def rewritten(data: bytes, edit) -> bytes:
    """`data` read back, changed by `edit(dataset)` and saved again as it is (no validation of the new values)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    edit(ds)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def _columns_as_text(ds):
    del ds.Columns
    ds.add_new(0x00280011, "LO", "abc")


@pytest.mark.parametrize("edit", [
    lambda ds: ds.add_new(0x00280010, "US", [64, 64]),  # Rows with two values
    _columns_as_text,
], ids=["rows-two-values", "columns-text"])
def test_unreadable_rows_or_columns_are_a_decode_error_not_a_crash(edit):
    with pytest.raises(ImageDecodeError, match="Rows/Columns") as info:
        decode_image(rewritten(make_dicom(gradient16(64, 64)), edit))
    assert info.value.code == "invalid_image"


def test_a_damaged_file_meta_element_is_a_decode_error_naming_the_file(tmp_path):
    data = bytearray(make_dicom(gradient16(8, 8)))
    tag = data.index(b"\x02\x00\x10\x00UI")  # (0002,0010) TransferSyntaxUID, explicit VR "UI"
    data[tag + 4:tag + 6] = b"\x55\xdf"  # two flipped bytes: a value representation pydicom does not know
    with pytest.raises(ImageDecodeError, match="file meta information"):
        decode_image(bytes(data))
    good, damaged = tmp_path / "good.dcm", tmp_path / "damaged.dcm"
    good.write_bytes(make_dicom(gradient16(8, 8)))
    damaged.write_bytes(bytes(data))
    with pytest.raises(DataCheckError, match=r"1 of 2 image\(s\) cannot be decoded:\n  .*damaged\.dcm: unreadable"):
        load_standardized([str(good), str(damaged)], Preprocessing(image_size=8))


def test_a_rescale_that_leaves_one_value_is_refused():
    with pytest.raises(ImageDecodeError, match="every pixel at one value"):
        decode_image(make_dicom(gradient16(), slope=0.0, intercept=100.0))


def deflated(ds_bytes: bytes) -> bytes:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    def to_deflated(ds):
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian

    return rewritten(ds_bytes, to_deflated)


def test_deflated_dicom_is_decoded_and_its_inflated_size_bounded_before_pydicom_reads_it():
    image = gradient16()
    assert decode_image(deflated(make_dicom(image))).shape == image.shape
    # Zeros deflate about a thousandfold: 8 MiB of pixels is a ~10 KB upload that pydicom would inflate whole.
    bomb = deflated(make_dicom(np.zeros((2048, 2048), np.uint16)))
    assert len(bomb) < 20_000
    with pytest.raises(ImageDecodeError, match="inflates beyond") as info:
        decode_image(bomb, max_pixels=1000)  # allowed: 4 * 1000 + DICOM_HEADER_ALLOWANCE bytes
    assert info.value.code == "image_too_large"


def compressed_by_gdcm(data: bytes, transfer_syntax: str, tmp_path) -> bytes:
    """`data` re-encoded by GDCM (the toolkit PACS exports come from) in a compressed transfer syntax."""
    import gdcm

    source, target = tmp_path / "plain.dcm", tmp_path / f"{transfer_syntax}.dcm"
    source.write_bytes(data)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, transfer_syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target.read_bytes()


@pytest.mark.parametrize("transfer_syntax, uid", [
    ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70"),  # the usual CR/DX export; no decoder before GDCM
    ("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
    ("JPEG2000Lossless", "1.2.840.10008.1.2.4.90"),
    ("RLELossless", "1.2.840.10008.1.2.5"),
])
def test_losslessly_compressed_dicom_decodes_to_the_same_image(transfer_syntax, uid, tmp_path):
    import pydicom

    plain = make_dicom(gradient16(), "MONOCHROME1", window=(1500.0, 2000.0))
    compressed = compressed_by_gdcm(plain, transfer_syntax, tmp_path)
    assert pydicom.dcmread(io.BytesIO(compressed)).file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(decode_image(compressed), decode_image(plain))


def corrupted(data: bytes, seed: int) -> bytes:
    """`data` with its pixel data mutated as a fuzzer does: bytes changed, cut out or put in."""
    rng, out = random.Random(seed), bytearray(data)
    pixel_data = data.find(b"\xe0\x7f\x10\x00")
    for _ in range(rng.choice([1, 2, 4, 16, 64])):
        at, edit = rng.randrange(pixel_data + 24, len(out)), rng.random()
        if edit < 0.7:
            out[at] = rng.randrange(256)
        elif edit < 0.85:
            del out[at:at + rng.randrange(1, 30)]
        else:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 20)))
    return bytes(out)


def test_a_compressed_dicom_that_crashes_the_decoder_is_a_decode_error_not_a_dead_process(tmp_path):
    """GDCM ends the process (std::terminate) on some corrupt streams: a served worker died with every request it
    held. Found by fuzzing a synthetic image's JPEG Lossless encoding."""
    y, x = np.mgrid[0:256, 0:256]
    noise = np.random.default_rng(0).integers(0, 200, (256, 256))
    image = ((np.sin(x / 9.0) + np.cos(y / 13.0) + 2) * 900 + noise).astype(np.uint16)
    crashing = tmp_path / "crashing.dcm"
    crashing.write_bytes(corrupted(compressed_by_gdcm(make_dicom(image), "JPEGLosslessProcess14_1", tmp_path), 197))

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, str(crashing)], capture_output=True, text=True, timeout=120)

    unprotected = run("import sys, pydicom; from pydicom.pixels import pixel_array; pixel_array(pydicom.dcmread("
                      "sys.argv[1]), index=0)")
    if unprotected.returncode >= 0:
        pytest.skip(f"this GDCM no longer crashes on the fixture (exit code {unprotected.returncode})")
    protected = run("import sys\nfrom cxr.data.decode import ImageDecodeError, decode_image\ntry:\n    "
                    "decode_image(sys.argv[1])\nexcept ImageDecodeError as exc:\n    print(exc.code, exc)")
    assert protected.returncode == 0, protected.stderr[-2000:]
    assert protected.stdout.startswith("invalid_image ") and "the DICOM decoder crashed" in protected.stdout


def labelled_htj2k(data: bytes) -> bytes:
    """`data` labelled High-Throughput JPEG 2000, a compression neither GDCM 3.2 nor Pillow decodes."""
    from pydicom.encaps import encapsulate

    def edit(ds):
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"

    return rewritten(data, edit)


def test_a_compression_without_a_decoder_has_its_own_code():
    """A valid file this install cannot decompress is not a broken image: the message names the compression."""
    with pytest.raises(ImageDecodeError, match="High-Throughput JPEG 2000") as info:
        decode_image(labelled_htj2k(make_dicom(gradient16())))
    assert info.value.code == "unsupported_dicom_compression"


def test_a_dicom_cut_short_in_its_compressed_pixel_data_is_called_truncated():
    """pydicom drops encapsulated pixel data cut short with only a warning: it was reported as a file without any."""
    from pydicom.uid import RLELossless

    whole = make_dicom((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7) % 4096)
    ds = pydicom.dcmread(io.BytesIO(whole))
    ds.compress(RLELossless)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match="pixel data is cut short") as info:
        decode_image(buffer.getvalue()[:-300])
    assert info.value.code == "invalid_image"


def test_a_colour_dicom_ignores_the_greyscale_window_tags():
    rgb = np.dstack([np.tile(np.linspace(0, 255, 64), (32, 1)).astype(np.uint8)] * 3)
    np.testing.assert_array_equal(decode_image(make_dicom(rgb, "RGB", window=(128, 20))),
                                  decode_image(make_dicom(rgb, "RGB")))


def test_a_palette_colour_dicom_is_read_through_its_palette():
    indices = np.tile(np.arange(256, dtype=np.uint8), (16, 1))
    ds = pydicom.dcmread(io.BytesIO(make_dicom(indices, "PALETTE COLOR")))
    reversed_grey = (np.arange(256)[::-1].astype("<u2") * 257).tobytes()
    for channel in range(3):  # red, green, blue: descriptor (256 entries, from 0, 16 bits) and data
        ds.add_new(0x00281101 + channel, "US", [256, 0, 16])
        ds.add_new(0x00281201 + channel, "OW", reversed_grey)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    np.testing.assert_array_equal(decode_image(buffer.getvalue()), 255 - indices)  # stored 0 shows white


def test_a_dicom_without_its_preamble_decodes_as_with_it():
    with_preamble = make_dicom(gradient16())
    expected = decode_image(with_preamble)
    np.testing.assert_array_equal(decode_image(with_preamble[132:]), expected)  # bare file meta, then the data set
    ds = pydicom.dcmread(io.BytesIO(with_preamble))
    del ds.file_meta
    ds.preamble = None
    bare = io.BytesIO()
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert bare.getvalue()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(decode_image(bare.getvalue()), expected)
