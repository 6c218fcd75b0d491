"""Every supported format decodes to the same greyscale picture; broken input fails clearly."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxr.data.decode import PNG_SIGNATURE, ImageDecodeError, decode_image


def gradient(h=40, w=60) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_png_modes_decode_to_same_gray(mode):
    gray = gradient()
    image = Image.fromarray(gray).convert(mode)
    out = decode_image(encode(image, "PNG"))
    assert out.dtype == np.uint8 and out.shape == gray.shape
    assert np.abs(out.astype(int) - gray).max() <= 3


@pytest.mark.parametrize("mode", ["L", "RGB", "CMYK"])
def test_jpeg_modes_decode_to_same_gray(mode):
    gray = gradient()
    out = decode_image(encode(Image.fromarray(gray).convert(mode), "JPEG", quality=95))
    assert out.dtype == np.uint8 and out.shape == gray.shape
    assert np.abs(out.astype(int) - gray).mean() <= 3


def test_png_16bit_uses_full_range():
    values = np.tile(np.linspace(1000, 4000, 50), (10, 1)).astype(np.uint16)  # a 12-bit detector range
    out = decode_image(encode(Image.fromarray(values), "PNG"))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)


def png_16_bit(channels: list[np.ndarray], exif: bytes | None = None) -> bytes:
    """A 16-bit PNG written chunk by chunk: grey+alpha (2 channels), RGB (3) or RGBA (4), as detector software
    exports them; Pillow cannot write these."""
    pixels = np.dstack(channels).astype(">u2")
    height, width, depth = pixels.shape
    colour_type = {2: 4, 3: 2, 4: 6}[depth]
    rows = b"".join(b"\x00" + pixels[y].tobytes() for y in range(height))
    return (PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + (png_chunk(b"eXIf", exif) if exif else b"") + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@pytest.mark.parametrize("channels", [2, 3, 4], ids=["grey+alpha", "RGB", "RGBA"])
def test_16_bit_colour_pngs_keep_all_16_bits(channels):
    values = np.tile(np.linspace(1000, 4000, 50), (10, 1)).astype(np.uint16)  # Pillow alone would give 3..15
    opaque = np.full_like(values, 65535)
    layers = {2: [values, opaque], 3: [values] * 3, 4: [values] * 3 + [opaque]}[channels]
    expected = decode_image(encode(Image.fromarray(values), "PNG"))
    assert np.abs(decode_image(png_16_bit(layers)).astype(int) - expected).max() <= 1


def test_16_bit_colour_png_alpha_and_exif_orientation():
    values = np.full((30, 50), 4000, np.uint16)
    alpha = np.full_like(values, 65535)
    alpha[:, 10:] = 0  # transparent right of a stripe: reads as black, as for 8-bit images
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = decode_image(png_16_bit([values, values, values, alpha], exif=exif.tobytes()[6:]))  # eXIf: no "Exif" prefix
    assert out.shape == (50, 30)
    assert out[:10].min() == 255 and out[10:].max() == 0  # the opaque stripe is now on top


def test_jpeg_and_exif_orientation():
    gray = np.zeros((30, 50), np.uint8)
    gray[:, :10] = 255  # bright stripe on the left
    plain = decode_image(encode(Image.fromarray(gray), "JPEG", quality=95))
    assert plain.shape == (30, 50) and plain[:, :8].mean() > 200
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    rotated = decode_image(encode(Image.fromarray(gray), "JPEG", quality=95, exif=exif.tobytes()))
    assert rotated.shape == (50, 30)
    assert rotated[:8, :].mean() > 200  # the stripe is now on top


def test_rgba_transparency_reads_as_black():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = 255  # white, fully transparent but for the top row
    rgba[0, :, 3] = 255
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert out[1:].max() == 0 and out[0].min() == 255


@pytest.mark.parametrize("pixels", [np.zeros((1, 1), np.uint8), np.full((300, 200), 128, np.uint8)])
def test_an_image_of_one_value_is_refused_as_a_blank_dicom_is(pixels):
    """A blank export was diagnosed (pneumonia, 84%) while a blank DICOM was refused."""
    with pytest.raises(ImageDecodeError, match=f"every pixel of the image has the value {pixels.flat[0]}"):
        decode_image(encode(Image.fromarray(pixels), "PNG"))


def test_palette_png_with_a_transparent_index_reads_it_as_black():
    """An opaque palette image is read straight to grey; one with a transparent entry still goes through RGBA."""
    gray = gradient()
    image = Image.fromarray(gray).convert("P")
    opaque = decode_image(encode(image, "PNG"))
    brightest = int(np.asarray(image)[0, -1])
    see_through = decode_image(encode(image, "PNG", transparency=brightest))
    hidden = np.asarray(image) == brightest
    assert see_through[hidden].max() == 0 and opaque[hidden].min() > 0
    np.testing.assert_array_equal(see_through[~hidden], opaque[~hidden])


@pytest.mark.parametrize("payload, code", [
    (b"", "empty_image"),
    (b"this is not an image at all", "invalid_image"),
])
def test_garbage_is_refused(payload, code):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(payload)
    assert err.value.code == code


def test_truncated_file_is_refused():
    data = encode(Image.fromarray(gradient(200, 200)), "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_checked_from_header():
    data = encode(Image.fromarray(np.zeros((100, 100), np.uint8)), "PNG")
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, max_pixels=5_000)
    assert err.value.code == "image_too_large" and "100x100" in str(err.value)
    data = encode(Image.fromarray(gradient(100, 100)), "PNG")
    assert decode_image(data, max_pixels=10_000).shape == (100, 100)  # exactly the limit is within it
    with pytest.raises(ImageDecodeError, match="over the limit of 9999"):
        decode_image(data, max_pixels=9_999)


@pytest.mark.parametrize("side", [10_000, 20_000])  # 100 Mpx: Pillow only warns; 400 Mpx: Pillow refuses itself
def test_a_header_beyond_pillow_s_own_limits_is_refused_as_too_large_with_the_limit_asked_for(side):
    header_only = PNG_SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) \
        + png_chunk(b"IEND", b"")  # an 8-bit grey image's header without its pixels
    with pytest.raises(ImageDecodeError, match="over the limit of 50000000") as err:
        decode_image(header_only, max_pixels=50_000_000)
    assert err.value.code == "image_too_large"


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "ICO"])
def test_formats_that_are_not_radiographs_are_not_parsed(fmt):
    with pytest.raises(ImageDecodeError, match="not a recognised image format .expected PNG, JPEG, TIFF, BMP or DICOM"):
        decode_image(encode(Image.fromarray(gradient()), fmt))


@pytest.mark.parametrize("fmt", ["TIFF", "BMP"])
def test_tiff_and_bmp_are_read(fmt):
    assert np.array_equal(decode_image(encode(Image.fromarray(gradient()), fmt)), gradient())


def test_corrupt_file_error_names_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        decode_image(bad)


@pytest.mark.parametrize("image, message", [
    (Image.new("LAB", (8, 8)), "cannot convert the image to greyscale"),  # PIL reads CIELab TIFFs, cannot convert them
    (Image.fromarray(np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32)), "not finite"),
], ids=["cielab-tiff", "nan-float-tiff"])
def test_readable_files_without_a_greyscale_image_are_a_decode_error(image, message):
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_image(encode(image, "TIFF"))
    assert info.value.code == "invalid_image"


def test_scaling_a_16_bit_image_needs_no_whole_image_float64_temporaries():
    import tracemalloc

    from cxr.data.decode import to_uint8

    pixels = (np.arange(2000 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2000, 2000)
    tracemalloc.start()
    try:
        scaled = to_uint8(pixels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 2 * pixels.size + 32 * 2**20  # the uint8 result and a chunk; float64 temporaries took ~22 bytes/pixel
    expected = np.round((pixels.astype(np.float64) - pixels.min()) * (255.0 / (pixels.max() - pixels.min())))
    assert np.array_equal(scaled, expected.astype(np.uint8))
    ties = np.arange(15, dtype=np.uint16).reshape(3, 5)  # 7 * 255 / 14 = 127.5: a tie, rounded as numpy rounds it
    assert np.array_equal(to_uint8(ties), np.round(ties * (255.0 / 14)).astype(np.uint8))


def tiff(pixels: np.ndarray, **kwargs) -> bytes:
    """TIFF layouts Pillow cannot write (16-bit colour, 16-bit WhiteIsZero, half-float), as tifffile writes them."""
    tifffile = pytest.importorskip("tifffile")
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("channels", [3, 4], ids=["RGB", "RGBA"])
def test_16_bit_colour_tiffs_keep_all_16_bits(channels):
    values = np.tile(np.linspace(1000, 4000, 50), (10, 1)).astype(np.uint16)  # Pillow alone would give 3..15
    layers = [values] * 3 + [np.full_like(values, 65535)] * (channels - 3)
    extra = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
    expected = decode_image(encode(Image.fromarray(values), "PNG"))
    out = decode_image(tiff(np.dstack(layers), photometric="rgb", **extra))
    assert out.max() == 255 and np.abs(out.astype(int) - expected).max() <= 1


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_a_16_bit_white_is_zero_tiff_is_inverted_like_an_8_bit_one(byteorder):
    values = np.tile(np.linspace(0, 4095, 64), (8, 1)).astype(np.uint16)  # stored 0 is white
    eight_bit = decode_image(tiff((values >> 4).astype(np.uint8), photometric="miniswhite"))
    assert eight_bit[0, 0] == 255 and eight_bit[0, -1] == 0
    try:
        sixteen_bit = decode_image(tiff(values, photometric="miniswhite", byteorder=byteorder))
    except ImageDecodeError as exc:  # Pillow opens only the little-endian layout: the other is refused as such
        assert byteorder == ">" and "a TIFF file whose header cannot be read" in str(exc)
    else:
        assert np.abs(sixteen_bit.astype(int) - eight_bit).max() <= 1


def test_16_bit_colour_png_orientation_is_read_wherever_the_file_keeps_it():
    values = np.full((30, 50), 4000, np.uint16)
    values[:, :10] = 1000  # a dark stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    plain = png_16_bit([values] * 3)
    iend = len(plain) - 12
    after_pixels = plain[:iend] + png_chunk(b"eXIf", exif.tobytes()[6:]) + plain[iend:]
    ihdr_end = len(PNG_SIGNATURE) + 25
    as_xmp = plain[:ihdr_end] + png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode()) + plain[ihdr_end:]
    for data in (after_pixels, as_xmp):
        out = decode_image(data)
        assert out.shape == (50, 30) and out[:10].max() == 0 and out[10:].min() == 255  # the stripe is now on top


@pytest.mark.parametrize("kind", ["TIFF", "PNG"])
def test_an_accepted_format_in_a_layout_pillow_cannot_open_is_named_as_that_format(kind):
    data = tiff(np.ones((8, 8), np.float16)) if kind == "TIFF" else encode(Image.fromarray(gradient()), "PNG")[:40]
    with pytest.raises(ImageDecodeError, match=f"a {kind} file whose header cannot be read"):
        decode_image(data)
