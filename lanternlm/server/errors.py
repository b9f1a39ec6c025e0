"""One error path for the server: every failure to serve a request becomes OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status when the request was at fault, and no
exception type or traceback ever reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import error_body

log = logging.getLogger("lanternlm.server")


class APIError(Exception):
    """An error to answer in OpenAI's shape with this status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


_PLAIN_TYPES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _union_tag(part) -> bool:
    """pydantic names the member of a union a value failed in its error's location ('str', 'list[int]')."""
    return isinstance(part, str) and (part in _PLAIN_TYPES or "[" in part)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """(message, param) for the first of pydantic's errors, with the field path as OpenAI's `param`."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _union_tag(p)]
    param = ".".join(loc) or "body"  # no field: the body as a whole is wrong (not an object, missing)
    kind = first.get("type")
    tags = []  # a value that fits none of a union's members: name them all, not just the first's complaint
    for error in errors:
        where = [str(p) for p in error.get("loc", ()) if p != "body"]
        base = [p for p in where if not _union_tag(p)]
        tag = next((p for p in where if _union_tag(p)), None)
        if base[:len(loc)] == loc and tag is not None and tag not in tags:
            tags.append(tag)
    if len(tags) > 1:
        return f"{param}: expected one of {', '.join(tags)}", param
    if kind == "extra_forbidden":
        return f"unsupported field {param!r}: Lantern does not implement it", param
    if kind == "json_invalid":
        return "the request body is not valid JSON", "body"
    if kind == "missing" and param == "body":
        return "the request body is missing", "body"
    msg = str(first.get("msg"))
    return (msg if param == "body" else f"{param}: {msg}"), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # Starlette's own errors (unknown route, wrong method, a body FastAPI could not read) in OpenAI's shape.
        if exc.status_code == 404:
            message, code = f"no route {request.url.path!r}; see /docs for the API", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(message, type_, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        # A bug, not the client's fault: logged in full here, and the client learns only that it happened.
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal error; the server log has the details", "server_error"),
                            status_code=500)
