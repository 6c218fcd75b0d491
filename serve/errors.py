"""The one error shape every endpoint answers with: {"error": {"code": ..., "message": ...}}."""
from __future__ import annotations

from fastapi import HTTPException
from starlette.responses import JSONResponse


class ServeError(HTTPException):
    """An HTTPException whose detail is already {"code", "message"}; pickles across LitServe workers."""

    def __init__(self, status_code: int, code: str, message: str):
        super().__init__(status_code=status_code, detail={"code": code, "message": message})


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status_code: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status_code, headers=headers)


# Codes for statuses raised by the framework itself (routing, auth, timeouts).
STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type",
                422: "invalid_request", 500: "internal_error", 503: "unavailable", 504: "timeout"}


def http_exception_response(status_code: int, detail, headers: dict | None = None) -> JSONResponse:
    if isinstance(detail, dict) and "code" in detail and "message" in detail:
        return error_response(status_code, str(detail["code"]), str(detail["message"]), headers)
    code = STATUS_CODES.get(status_code, "error")
    message = detail if isinstance(detail, str) and detail else code.replace("_", " ")
    return error_response(status_code, code, message, headers)
