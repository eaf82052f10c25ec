"""A bound on the size of a request to a served model, checked before its body is read.

MLflow's scoring server (`mlflow models serve`) reads a request's whole body, parses the JSON
and builds a DataFrame before the model sees any of it: a 165 MB request left the serving
process about 214 MB larger for good, although the model then refused its oversized image.
MLflow has no setting for this and uvicorn none for a body's size, so when MLflow's scoring
server loads one of equip's models (`serve_with_request_limit`, from the pyfunc's
load_context), the server's app is wrapped in `RequestSizeLimit`, an ASGI middleware: a body
over MAX_REQUEST_BYTES, known from its Content-Length (or counted as a chunked body streams
in), is answered 413 with one line, and what the client still sends is read into nothing, so
the client gets the answer rather than a reset connection.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
MB = 2**20
MAX_REQUEST_BYTES = 64 * MB  # a 20 MB image base64-encoded is ~27 MB of JSON


class TooLarge(Exception):
    pass


def mlflow_error(text: str) -> bytes:
    """An error body in MLflow's scoring server's format."""
    return json.dumps({"error_code": "INVALID_PARAMETER_VALUE", "message": text}).encode()


class RequestSizeLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, before the app reads it; the
    body of the answer is `error_body(one line)` (MLflow's format unless told)."""

    def __init__(
        self,
        app: Callable[..., Awaitable[None]],
        max_bytes: int = MAX_REQUEST_BYTES,
        error_body: Callable[[str], bytes] = mlflow_error,
    ):
        self.app, self.max_bytes, self.error_body = app, max_bytes, error_body

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                await _refuse(int(length), self.max_bytes, receive, send, self.error_body)
            else:
                await self.app(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:  # no Content-Length: a chunked body, counted
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except TooLarge:
            await _refuse(received, self.max_bytes, receive, send, self.error_body)


async def _refuse(
    size: int, limit: int, receive: Receive, send: Send, error_body: Callable[[str], bytes]
) -> None:
    """Read the rest of the body into nothing, then answer 413 with one line, so that the
    client, still sending, gets the answer."""
    message: Message = {"more_body": True}
    while message.get("more_body") and message.get("type") != "http.disconnect":
        message = await receive()
    text = (
        f"request body of {size / MB:.0f} MB; a request holds at most {limit // MB} MB: send "
        "fewer or smaller images per request"
    )
    body = error_body(text)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def serve_with_request_limit() -> None:
    """In the process of MLflow's scoring server, which loads the model just before it builds
    its FastAPI app: every FastAPI app of the process gets RequestSizeLimit around it, when its
    first request builds its middleware stack. MLflow offers no hook for this (its app is
    built inside one function call, with no middleware setting), hence the wrapped method;
    elsewhere (predict, a notebook) nothing changes."""
    try:
        from fastapi import FastAPI
        from mlflow.pyfunc import scoring_server
    except ImportError:  # MLflow without its serving extras
        return
    if getattr(scoring_server, "_SERVER_MODEL_PATH", None) not in os.environ:
        return
    build = FastAPI.build_middleware_stack
    if getattr(build, "equip_request_limit", False):
        return

    def build_limited(app: FastAPI) -> Any:
        return RequestSizeLimit(build(app))

    build_limited.equip_request_limit = True  # type: ignore[attr-defined]
    FastAPI.build_middleware_stack = build_limited  # type: ignore[method-assign]
