"""Request decoding: multipart or JSON/base64 payloads -> greyscale images, or a ServeError.

Everything here runs on the payload LitServe hands to `decode_request` (a dict from JSON, or a
starlette FormData); client-supplied strings are never used as file paths.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

import numpy as np

from cxr.data.decode import ImageDecodeError, decode_image
from serve.errors import ServeError

# ImageDecodeError code -> HTTP status. Oversized images are 413 (like oversized payloads); a DICOM compression
# this install has no decoder for is 415, a format the server does not support, not a broken file.
DECODE_STATUS = {"image_too_large": 413, "unsupported_dicom_compression": 415}


@dataclass
class DecodedImage:
    gray: np.ndarray
    sha256: str


class HealthProbe:
    """Sent by /health through the real inference queue; JSON and forms can never produce it."""


def _is_upload(value) -> bool:
    return hasattr(value, "filename") and hasattr(value, "file")


def _upload_bytes(value) -> bytes:
    value.file.seek(0)
    return value.file.read()


def _b64(value, field: str) -> bytes:
    if not isinstance(value, str):
        raise ServeError(422, "invalid_base64", f"'{field}' must be a base64 string, got {type(value).__name__}")
    if value[:5].lower() == "data:" and "," in value:  # tolerate data URLs (the scheme is case-insensitive)
        value = value.split(",", 1)[1]
    value = "".join(value.split())  # line-wrapped base64 (`base64` CLI, MIME) is still base64
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServeError(422, "invalid_base64", f"'{field}' is not valid base64: {exc}") from exc


def _fields(payload) -> list[str]:
    try:
        return sorted({str(k) for k in payload.keys()})
    except Exception:
        return []


def image_bytes(payload, many: bool) -> list[bytes]:
    """Raw bytes of the image(s) in the request. `many`: the batch contract (`files` / `images`)."""
    form_field, json_field = ("files", "images") if many else ("file", "image")
    if isinstance(payload, dict):  # JSON body
        if json_field not in payload:
            raise ServeError(422, "missing_field", f"JSON body needs the key '{json_field}' "
                             f"(got keys {_fields(payload)})")
        value = payload[json_field]
        if many:
            if not isinstance(value, list):
                raise ServeError(422, "invalid_request", f"'{json_field}' must be a list of base64 strings")
            return [_b64(item, f"{json_field}[{i}]") for i, item in enumerate(value)]
        return [_b64(value, json_field)]
    if hasattr(payload, "getlist"):  # multipart / urlencoded form
        values = payload.getlist(form_field)
        if not values:
            raise ServeError(422, "missing_field", f"multipart form needs the file field '{form_field}' "
                             f"(got fields {_fields(payload)})")
        if not many and len(values) > 1:
            raise ServeError(422, "too_many_files", f"send one file in '{form_field}'; use /predict/batch for more")
        if not all(_is_upload(v) for v in values):
            raise ServeError(422, "not_a_file", f"form field '{form_field}' must be a file upload")
        return [_upload_bytes(v) for v in values]
    raise ServeError(415, "unsupported_media_type", "send multipart/form-data or application/json")


def decode_bytes(data: bytes, max_pixels: int) -> DecodedImage:
    try:
        gray = decode_image(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        raise ServeError(DECODE_STATUS.get(exc.code, 422), exc.code, str(exc)) from exc
    return DecodedImage(gray=gray, sha256=hashlib.sha256(data).hexdigest())


def target_class(payload) -> str | None:
    value = payload.get("target_class") if hasattr(payload, "get") else None
    if value is None or value == "":
        return None
    if _is_upload(value) or not isinstance(value, (str, int)) or isinstance(value, bool):
        raise ServeError(422, "invalid_target_class", "'target_class' must be a class name or index")
    return str(value)
