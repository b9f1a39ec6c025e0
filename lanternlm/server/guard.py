"""The server's front gate, as plain ASGI middleware: the API key, the body-size limit, and the raw body's
checks (UTF-8, JSON, nesting depth, lone surrogates) before FastAPI sees it, plus the request counter.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one wraps `receive`, and behind it a route can no
longer see its client disconnect, so abandoned non-streamed requests would go on computing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from collections.abc import Callable

from fastapi.responses import JSONResponse

from .protocol import error_body

MAX_JSON_DEPTH = 64  # nesting of arrays and objects; real requests (tools' JSON schemas included) stay far below
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \uD800-\uDFFF: half of a UTF-16 pair
_BIG_EXPONENT = re.compile(r"[eE][+-]?\d{3}")        # 1e308 and beyond may parse as inf


class BodyError(Exception):
    """The raw body cannot be a request: (status, message, param)."""

    def __init__(self, status: int, message: str, param: str | None = "body"):
        super().__init__(message)
        self.status, self.param = status, param


def _no_constant(name: str):
    raise BodyError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def check_json_body(body: bytes) -> None:
    """Raise BodyError unless `body` is UTF-8 JSON, nested at most MAX_JSON_DEPTH deep, whose strings are all
    encodable text (JSON's "\\ud800" escape can name half a UTF-16 pair, which is no character at all)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise BodyError(400, f"the request body's JSON is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise BodyError(400, f"the request body is not valid JSON: {e}") from None
    # Walk only when the text could hold what the walk looks for: a surrogate escape, deep nesting, or an exponent
    # large enough to overflow to inf. A big flat body (a long list of token ids) is not walked item by item on
    # the event loop.
    if not (_SURROGATE_ESCAPE.search(text) or text.count("[") + text.count("{") > MAX_JSON_DEPTH
            or _BIG_EXPONENT.search(text)):
        return
    # Walk without recursion: (value, path, depth).
    todo = [(value, [], 0)]
    while todo:
        item, path, depth = todo.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise BodyError(400, f"the request body's JSON is nested more than {MAX_JSON_DEPTH} levels deep",
                                ".".join(path[:3]) or "body")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _check_text(key, path)
                todo.append((child, path + [str(key)], depth + 1))
        elif isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, float) and not math.isfinite(item):  # 1e999 parses as inf
            raise BodyError(400, f"{'.'.join(path) or 'body'}: number out of range", ".".join(path) or "body")


def _check_text(text: str, path: list[str]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = ".".join(path) or "body"
        raise BodyError(400, f"{where}: contains a lone UTF-16 surrogate (U+{ord(text[e.start]):04X}), which is "
                             "not a character; send whole characters", where) from None


class Guard:
    """ASGI middleware: authentication, body limits and checks, and per-route request counts."""

    def __init__(self, app, *, api_keys: tuple[str, ...], max_body_bytes: int, public_metrics: bool,
                 count: Callable[[str, int], None], routes: set[str]):
        # Each accepted "Bearer KEY" header -> a short id of the key, which routes read from the request's
        # state (the prefix cache's partition); the key itself is not kept anywhere else.
        self.accepted = {f"Bearer {key}": hashlib.sha256(key.encode()).hexdigest()[:16] for key in api_keys}
        self.app, self.max_body_bytes = app, max_body_bytes
        self.public_metrics, self.count, self.routes = public_metrics, count, routes

    def key_id(self, authorization: str | None) -> str | None:
        """The id of the key this Authorization header carries, if it is one of ours. Every key is compared
        in constant time, so the time taken says nothing about how close a guess was."""
        found = None
        for accepted, key_id in self.accepted.items():
            if hmac.compare_digest(accepted.encode(), (authorization or "").encode()):
                found = key_id
        return found

    def needs_key(self, path: str) -> bool:
        if path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/tokenizer_info"):
            return True
        return path == "/metrics" and not self.public_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        # A label per route the app has, one for everything else: random paths must not grow the metrics.
        label = path if path in self.routes else "other"
        status = {}

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        async def reply(code: int, body: dict, headers: dict | None = None):
            await JSONResponse(body, status_code=code, headers=headers)(scope, receive, counted_send)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            key_id = self.key_id(headers.get("authorization"))
            if self.accepted and self.needs_key(path) and key_id is None:
                return await reply(401, error_body("invalid or missing API key", "authentication_error",
                                                   code="invalid_api_key"))
            if key_id is not None:
                scope.setdefault("state", {})["api_key_id"] = key_id
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                return await reply(413, error_body(f"request body larger than {self.max_body_bytes} bytes",
                                                   param="body", code="request_too_large"))
            if scope["method"] == "POST":
                body, more = [], True
                size = 0
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left before sending its request: nothing to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body_bytes:  # a chunked body with no Content-Length
                        return await reply(413, error_body(f"request body larger than {self.max_body_bytes} bytes",
                                                           param="body", code="request_too_large"))
                    body.append(chunk)
                    more = message.get("more_body", False)
                raw = b"".join(body)
                if raw:
                    try:
                        check_json_body(raw)
                    except BodyError as e:
                        return await reply(e.status, error_body(str(e), param=e.param))
                    # Every route takes JSON, so the body is read as JSON whatever its Content-Type says
                    # (`curl -d` without -H sends form encoding).
                    scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
                             + [(b"content-type", b"application/json")]}
                receive = _replay(raw, receive)
            await self.app(scope, receive, counted_send)
        finally:
            self.count(label, status.get("code", 499))  # 499: the client closed before any answer


def _replay(raw: bytes, receive):
    """A `receive` that hands the already-read body over once, then passes the client's messages
    (a disconnect) through."""
    given = False

    async def replayed():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed
