"""Turn any supported image file (PNG 8/16-bit, JPEG, DICOM; grey, RGB, RGBA, palette) into one
8-bit greyscale array. Training, evaluation and serving all decode through `decode_image`."""
from __future__ import annotations

import io
import multiprocessing
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Bumped whenever a change to decoding changes what any file decodes to (its pixels, or whether it is refused):
# image caches are keyed by it, so none serves what an older decoder made. 2: 16-bit colour PNGs keep all 16
# bits; 3: images of one value, and formats other than RASTER_FORMATS, are refused; 4: 16-bit colour TIFFs keep all
# 16 bits, 16-bit WhiteIsZero TIFFs are inverted, PALETTE COLOR DICOMs are read through their palette, colour DICOMs
# ignore the rescale and window tags (which describe greyscale images), DICOMs without a preamble are read.
DECODER_VERSION = 4
# Refuse decompression bombs by the size the header declares, before any pixel is decoded.
DEFAULT_MAX_PIXELS = 50_000_000
DICOM_MAGIC_OFFSET = 128
# The raster formats read, those of radiographs: Pillow would parse some thirty others, each one more parser exposed
# to uploads.
RASTER_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# How each of RASTER_FORMATS begins: a file that does but that Pillow cannot open is a layout it does not read.
RASTER_SIGNATURES = {"PNG": (PNG_SIGNATURE,), "JPEG": (b"\xff\xd8",), "TIFF": (b"II*\x00", b"MM\x00*"),
                     "BMP": (b"BM",)}
# Photometric interpretation 0 (TIFF tag 262): the TIFF form of DICOM's MONOCHROME1. Pillow inverts 8-bit ones only.
TIFF_PHOTOMETRIC_TAG, TIFF_WHITE_IS_ZERO = 262, 0
TIFF_BITS_PER_SAMPLE_TAG = 258
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"
# Seconds a child process may take to decode one compressed DICOM frame (see _first_frame_in_a_child_process).
COMPRESSED_DECODE_TIMEOUT_S = 60
# Bytes a DICOM data set may hold besides its pixels (tags, overlays, a thumbnail), when its inflated size is bounded.
DICOM_HEADER_ALLOWANCE = 4 << 20


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image; the message says why."""

    def __init__(self, message: str, code: str = "invalid_image"):
        super().__init__(message)
        self.code = code


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            code="image_too_large",
        )


SCALE_CHUNK = 1 << 20  # pixels scaled at a time by to_uint8


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale any numeric greyscale array to uint8 over its own range (16-bit PNGs rarely use all 16 bits)."""
    if pixels.dtype == np.uint8:
        return pixels
    if np.issubdtype(pixels.dtype, np.floating) and not np.isfinite(pixels).all():
        raise ImageDecodeError("image has pixel values that are not finite numbers (NaN or infinity)")
    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.zeros(pixels.shape, dtype=np.uint8)
    # float64 arithmetic a chunk at a time straight into the uint8 result: a 50-megapixel 16-bit image needs
    # 50 MB more, not 1.2 GB of whole-image float64 temporaries (a 113 kB upload could make a worker take that).
    scale = 255.0 / (hi - lo)
    flat, out = pixels.reshape(-1), np.empty(pixels.size, dtype=np.uint8)
    for start in range(0, flat.size, SCALE_CHUNK):
        chunk = flat[start:start + SCALE_CHUNK].astype(np.float64)
        out[start:start + SCALE_CHUNK] = np.round((chunk - lo) * scale)
    return out.reshape(pixels.shape)


# (7FE0,0010) as written in a little-endian data set, the encoding of nearly every DICOM file.
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


def is_dicom(data: bytes) -> bool:
    """A DICOM file: with its 128-byte preamble and "DICM", or (as older archives and some PACS exports write
    them) a bare data set opening with a little-endian group 0002 (file meta) or 0008 element, which no raster
    format's signature does."""
    with_preamble = len(data) >= DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM"
    return with_preamble or data[:2] in (b"\x02\x00", b"\x08\x00") and len(data) > DICOM_MAGIC_OFFSET


def _check_deflated_size(data: bytes, max_pixels: int) -> None:
    """pydicom inflates a deflated data set whole before any header can be checked: a 1 MB upload can inflate to
    gigabytes. Inflate it here first, bounded by what one frame of the largest allowed image and a header need
    (a deflated multi-frame file beyond that is refused: only the first frame would be used)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    stream = io.BytesIO(data)
    try:
        read_preamble(stream, True)  # force: a data set without preamble is read from its first byte
        meta = _read_file_meta_info(stream)
        transfer_syntax = meta.get("TransferSyntaxUID")  # elements are parsed lazily: a damaged one raises here
    except Exception as exc:
        raise ImageDecodeError(f"unreadable DICOM file meta information: {exc}") from exc
    if transfer_syntax != DEFLATED_TRANSFER_SYNTAX:
        return
    limit = 4 * max_pixels + DICOM_HEADER_ALLOWANCE  # up to 32-bit (or 8-bit RGB) pixels; one frame
    try:
        inflated = len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[stream.tell():], limit + 1))
    except zlib.error as exc:
        raise ImageDecodeError(f"corrupt deflated DICOM data: {exc}") from exc
    if inflated > limit:
        raise ImageDecodeError(f"deflated DICOM data inflates beyond {limit} bytes, more than an image within the "
                               f"limit of {max_pixels} pixels needs", code="image_too_large")


def _check_decoder_for(transfer_syntax) -> None:
    """A file compressed in a way no installed pydicom plugin decodes is a valid image this install cannot read,
    not a broken one: say which compression it is."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    try:
        available = get_decoder(transfer_syntax).is_available
    except NotImplementedError:  # no decoder at all for this transfer syntax
        available = False
    if not available:
        raise ImageDecodeError(f"DICOM pixel data compressed as {UID(transfer_syntax).name!r} ({transfer_syntax}) "
                               "cannot be decoded by this install: send it uncompressed, or as PNG",
                               code="unsupported_dicom_compression")


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    _check_deflated_size(data, max_pixels)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)  # is_dicom decided: with or without preamble
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageDecodeError(f"unreadable DICOM file: {exc}") from exc
    if "PixelData" not in ds:
        if PIXEL_DATA_TAG in data:  # pydicom drops pixel data cut short with only a warning
            raise ImageDecodeError("the DICOM file's pixel data is cut short: truncated file?")
        # pydicom reads a file cut between two elements as a shorter, whole one: the cut cannot be told apart
        raise ImageDecodeError("DICOM file has no pixel data: a DICOM object that is not an image, or a file cut "
                               "short before its pixels", code="dicom_without_pixels")
    try:  # header values may be missing, multi-valued, of the wrong length or not numbers
        columns, rows = int(ds.get("Columns", 0)), int(ds.get("Rows", 0))
    except Exception as exc:
        raise ImageDecodeError(f"unreadable DICOM Rows/Columns: {type(exc).__name__}: {exc}") from exc
    _check_pixels(columns, rows, max_pixels)
    if not ds.file_meta.get("TransferSyntaxUID"):  # no file meta: uncompressed, in the encoding pydicom read it in
        implicit_vr, little_endian = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else \
            ExplicitVRLittleEndian if little_endian else ExplicitVRBigEndian
    transfer_syntax = ds.file_meta.TransferSyntaxUID
    _check_decoder_for(transfer_syntax)
    # Only the first frame is decoded: the pixel limit then bounds the work whatever NumberOfFrames says.
    if UID(str(transfer_syntax)).is_compressed:
        pixels = _first_frame_in_a_child_process(data)
    else:
        try:
            pixels = pixel_array(ds, index=0)
        except Exception as exc:
            raise ImageDecodeError(f"cannot decode DICOM pixel data: {exc}") from exc
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric == "PALETTE COLOR":  # the stored values index the palette's colours
        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:
            raise ImageDecodeError(f"cannot apply the DICOM palette: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim == 3:  # colour: the rescale and window modules describe greyscale images only
        pixels = pixels.mean(axis=-1)
    else:
        try:  # rescale and window come from header values that may be missing, zero or not numbers
            pixels = np.asarray(apply_voi_lut(apply_modality_lut(pixels, ds), ds, index=0))
        except Exception as exc:
            raise ImageDecodeError(f"cannot apply the DICOM rescale/window: {type(exc).__name__}: {exc}") from exc
    if pixels.size and np.ptp(pixels) == 0:  # e.g. RescaleSlope 0: nothing of the image is left
        raise ImageDecodeError("the DICOM rescale/window leaves every pixel at one value")
    gray = to_uint8(pixels)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray


def _first_frame(data: bytes, answer) -> None:
    """In a child process: send back (True, the first frame's pixels) or (False, why they cannot be decoded)."""
    import pydicom
    from pydicom.pixels import pixel_array

    try:
        answer.send((True, pixel_array(pydicom.dcmread(io.BytesIO(data)), index=0)))
    except Exception as exc:
        answer.send((False, str(exc)))


def _first_frame_in_a_child_process(data: bytes) -> np.ndarray:
    """Compressed pixel data is decoded by GDCM, which ends the whole process (std::terminate) on some corrupt
    streams instead of raising: a served worker would die with every request it held. In a child process, such a
    file is one more image that cannot be decoded. The fork server forks children from a clean process, not from
    this one's threads."""
    context = multiprocessing.get_context("forkserver")
    # Takes effect when the fork server starts (the first call): children then fork with the decoders imported.
    context.set_forkserver_preload(["pydicom.pixels", "gdcm", __name__])
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_first_frame, args=(data, send), name="cxr-dicom-decode")
    child.start()
    send.close()
    try:
        if not receive.poll(COMPRESSED_DECODE_TIMEOUT_S):
            raise ImageDecodeError(f"decoding the compressed DICOM pixel data took over "
                                   f"{COMPRESSED_DECODE_TIMEOUT_S} s")
        decoded, result = receive.recv()
    except EOFError:  # the child ended without an answer
        child.join(5)
        raise ImageDecodeError(f"the DICOM decoder crashed on this file's compressed pixel data (exit code "
                               f"{child.exitcode})") from None
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join()
    if not decoded:
        raise ImageDecodeError(f"cannot decode DICOM pixel data: {result}")
    return result


def _decode_raster(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89.5 Mpx on and refuses from 179 Mpx; the size checked is max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
            _check_pixels(*image.size, max_pixels)
            if is_16_bit_colour(data, image):
                return _decode_16_bit_colour(data, image)
            image.load()
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image is over the limit of {max_pixels} pixels ({exc})", code="image_too_large") \
            from exc
    except UnidentifiedImageError as exc:
        kind = next((name for name, signatures in RASTER_SIGNATURES.items() if data.startswith(signatures)), None)
        if kind:
            raise ImageDecodeError(f"a {kind} file whose header cannot be read: a {kind} layout this decoder does not "
                                   "support (a TIFF of 16-bit grey+alpha or of half-floats, say), or a file cut short "
                                   "in its header; send it as an 8- or 16-bit grey PNG") from exc
        raise ImageDecodeError(f"not a recognised image format (expected {', '.join(RASTER_FORMATS)} or DICOM)") \
            from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise ImageDecodeError(f"not a decodable image ({type(exc).__name__}: {exc})") from exc
    try:  # a readable file can still hold what PIL cannot rotate or convert (a CIELab TIFF, a broken EXIF)
        gray = _to_gray(ImageOps.exif_transpose(image))
        return 255 - gray if _is_wide_white_is_zero(image) else gray
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(f"cannot convert the image to greyscale ({type(exc).__name__}: {exc})") from exc


def is_16_bit_colour(data: bytes, header: Image.Image) -> bool:
    """A 16-bit PNG of colour type grey+alpha, RGB or RGBA (from its IHDR chunk), or a TIFF of 16-bit colour
    samples: Pillow reads those as 8-bit, keeping each sample's high byte, so a 12-bit detector image would come
    out in 0..15."""
    if header.format == "TIFF":
        bits = header.tag_v2.get(TIFF_BITS_PER_SAMPLE_TAG, 8)
        return header.mode in ("RGB", "RGBA") and max(bits if isinstance(bits, tuple) else (bits,)) > 8
    return data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 25 and data[24] == 16 \
        and data[25] in (2, 4, 6)


def _decode_16_bit_colour(data: bytes, header: Image.Image) -> np.ndarray:
    """OpenCV keeps all 16 bits (as BGR or BGRA; grey+alpha comes as BGRA too). The grey is Pillow's L weighting,
    alpha composited over black as for 8-bit images, then scaled over its range like a 16-bit grey image; the
    orientation `header` (the same file opened by Pillow) declares in any of its places (EXIF before or after the
    pixels, a raw profile, XMP) is applied last."""
    import cv2

    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ImageDecodeError(f"not a decodable 16-bit colour {header.format}")
    gray = pixels[..., 2] * np.float32(0.299) + pixels[..., 1] * np.float32(0.587) + pixels[..., 0] * np.float32(0.114)
    if pixels.shape[2] == 4:
        gray *= pixels[..., 3] / np.float32(65535)
    orientation = header.getexif().get(ExifTags.Base.Orientation, 1)  # a PNG's chunks after its pixels load here
    oriented = Image.fromarray(to_uint8(gray))
    oriented.getexif()[ExifTags.Base.Orientation] = orientation
    return np.asarray(ImageOps.exif_transpose(oriented))


def _is_wide_white_is_zero(image: Image.Image) -> bool:
    return image.format == "TIFF" and image.mode in WIDE_GREY_MODES \
        and image.tag_v2.get(TIFF_PHOTOMETRIC_TAG) == TIFF_WHITE_IS_ZERO


def _to_gray(image: Image.Image) -> np.ndarray:
    if image.mode in WIDE_GREY_MODES:
        return to_uint8(np.asarray(image))
    if image.mode == "P" and "transparency" not in image.info:
        return np.asarray(image.convert("L"))  # the same grey as via RGBA, without 13 bytes a pixel of temporaries
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        # Composite over black: transparent margins read as air, not as bright tissue.
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return np.asarray(image.convert("L"))


def decode_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode bytes or a file into an HxW uint8 greyscale array, or raise ImageDecodeError."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ImageDecodeError(f"cannot read {path}: {exc}", code="unreadable_file") from exc
        try:
            return decode_image(data, max_pixels)
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{path}: {exc}", code=exc.code) from exc
    if not source:
        raise ImageDecodeError("empty file", code="empty_image")
    if is_dicom(source):
        try:
            return _decode_dicom(source, max_pixels)
        except ImageDecodeError:
            raise
        except Exception as exc:  # pydicom parses lazily: a damaged element can raise anywhere
            raise ImageDecodeError(f"unreadable DICOM file: {type(exc).__name__}: {exc}") from exc
    gray = _decode_raster(source, max_pixels)
    if gray.min() == gray.max():  # as a DICOM whose window leaves one value: a blank export, not a radiograph
        raise ImageDecodeError(f"every pixel of the image has the value {gray.flat[0]}: nothing to classify")
    return gray
