"""ASGI guard in front of the model endpoints.

LitServe parses the body in the API process before any LitAPI code runs, so an empty or malformed
body would surface as a 500. The guard answers those itself with a 4xx JSON error, quickly and with
bounded memory: it checks the API key, media type and declared length first, reads at most
`max_bytes` of body, checks that JSON / multipart parses, then replays the body downstream.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.requests import Request

from serve.errors import error_response

log = logging.getLogger(__name__)

MEDIA_TYPES = ("application/json", "multipart/form-data")
MAX_JSON_DEPTH = 32  # a request is {"image": ...} or {"images": [...]}; 32 leaves room for any metadata


class RequestGuard:
    def __init__(self, app, paths: list[str], max_bytes: int, api_key: str | None = None, max_in_flight: int = 32,
                 deadline: float = 120.0):
        self.app = app
        # LitServe waits for a worker's answer without end, so a request held by a worker that died (a native
        # crash, the OOM killer) would keep its place below max_in_flight for good: past the deadline it is
        # answered 504 and its place freed.
        self.deadline = float(deadline)
        self.paths = set(paths)
        self.max_bytes = int(max_bytes)
        self.api_key = api_key or None
        # Each request in flight holds its body (up to max_bytes) several times over until a worker answers: without
        # a cap, a burst of large uploads grows the API process without bound instead of being told to retry.
        self.max_in_flight = int(max_in_flight)
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            return await error_response(503, "overloaded", f"{self.in_flight} requests are in progress, this server "
                                        "process's limit (server.max_in_flight): retry shortly",
                                        {"Retry-After": "1", "Connection": "close"})(scope, receive, send)
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        async def send_then_release(message) -> None:
            # Freed as the answer's last part goes out, not after: a keep-alive client may send its next request
            # on the same connection before this call returns, and must not find its own answered request
            # still counted.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            try:  # a client that stops sending its body (a stalled upload) must not hold its place for good
                reply = await asyncio.wait_for(self._check(scope, receive), self.deadline)
            except TimeoutError:
                reply = 408, "request_timeout", f"the request body did not arrive within {self.deadline:g} s " \
                                                "(server.deadline)"
            if isinstance(reply, tuple):
                status, code, message = reply
                # Close the connection when the body was not read, so the client stops sending it.
                headers = {"Connection": "close"} if status in (408, 413) else None
                return await error_response(status, code, message, headers)(scope, receive, send_then_release)
            return await self._answer_by_deadline(_lowercase_media_type(scope), _replay(reply, receive),
                                                  send_then_release)
        finally:
            release()

    async def _answer_by_deadline(self, scope, receive, send) -> None:
        started = False

        async def send_noting_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, send_noting_start), self.deadline)
        except TimeoutError:
            log.error("%s: no answer within server.deadline=%g s; answered 504", scope["path"], self.deadline)
            if not started:
                await error_response(504, "timeout", f"no answer within {self.deadline:g} s (server.deadline): "
                                     "retry")(scope, receive, send)

    async def _check(self, scope, receive):
        headers = Headers(scope=scope)
        if self.api_key:
            given = headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return 401, "unauthorized", "missing or wrong API key: send it in the X-API-Key header"
        declared = headers.get("content-length")
        if declared is not None:
            try:
                declared_size = int(declared)
            except ValueError:
                return 400, "bad_request", "invalid Content-Length header"
            if declared_size > self.max_bytes:
                return 413, "payload_too_large", f"body is {declared_size} bytes; the limit is {self.max_bytes}"
            if declared_size == 0:
                return 400, "empty_body", "the request body is empty; send an image"
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media not in MEDIA_TYPES:
            return 415, "unsupported_media_type", (f"Content-Type {media or '(none)'} is not supported; send "
                                                   "multipart/form-data (field 'file' / 'files') or application/json")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 400, "bad_request", "client disconnected"
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return 413, "payload_too_large", f"body exceeds the limit of {self.max_bytes} bytes"
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not body.strip():
            return 400, "empty_body", "the request body is empty; send an image"
        if media == "application/json":
            try:
                parsed = json.loads(body)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
                return 400, "malformed_json", f"request body is not valid JSON: {type(exc).__name__}: {exc}"
            if not isinstance(parsed, dict):
                return 422, "invalid_request", "JSON body must be an object like {\"image\": \"<base64>\"}"
            if nesting_depth(parsed) > MAX_JSON_DEPTH:  # the body travels pickled to a worker: deep nesting breaks that
                return 400, "malformed_json", f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels"
            return body
        boundary = parse_options_header(headers.get("content-type", ""))[1].get(b"boundary", b"")
        if not boundary or body.rfind(b"--" + boundary + b"--") == -1:  # an epilogue may follow the closing one
            # The parser takes a body cut short and drops its unfinished part: the request would be called
            # "missing field" for a file that was sent, but not whole.
            return 400, "malformed_multipart", ("multipart body has no boundary or does not end with its closing "
                                                "boundary: it was cut short")
        try:
            form = await Request(scope, _replay(body, _disconnected)).form()
            await form.close()
        except Exception as exc:  # multipart errors: missing boundary, truncated parts, too many parts, ...
            if "Too many" in str(exc):  # Starlette's cap on files or fields (1000): far over any image limit
                return 413, "too_many_images", f"request body has too many parts: {exc}"
            return 400, "malformed_multipart", f"request body is not valid multipart/form-data: {exc}"
        return body


def nesting_depth(value) -> int:
    """How deeply lists and objects nest in parsed JSON (iterative: the value may be too deep for recursion)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _lowercase_media_type(scope) -> dict:
    """The scope with its Content-Type's media type lower-cased (parameters such as the multipart boundary are
    case-sensitive and kept): media types are case-insensitive, but LitServe compares them as written."""
    headers = []
    for name, value in scope["headers"]:
        if name.lower() == b"content-type":
            media, sep, params = value.partition(b";")
            value = media.strip().lower() + sep + params
        headers.append((name, value))
    return {**scope, "headers": headers}


async def _disconnected() -> dict:
    return {"type": "http.disconnect"}


def _replay(body: bytes, then):
    """An ASGI receive() that hands over the already-read body once, then defers to `then`."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await then()

    return receive
