"""The app's HTTP side: the page (`GET /`) and its JSON API, on FastAPI.

    GET  /         the page: drop or pick photos, see each one's top classes
    POST /predict  photos as multipart (field `files`) or JSON {"images": [base64, ...]}
    GET  /model    name, version, run id, classes, image size, runtime, where to see the run
    GET  /health   {"status": "ok", ...} once a model is loaded
    POST /reload   serve the registry's champion now (a fixed model URI: 409; none found: 503)

Every error is one line of JSON, `{"error": "..."}`: 4xx for the client's mistakes (equip.serve's
bounds: a body over MAX_REQUEST_BYTES is refused 413 from its size before it is read), 500 with
no detail for the server's, whose traceback stays in the server's log.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from equip.serve.app._requests import ClientError, classify, read_photos
from equip.serve.app.models import ModelHolder, first_line, follows_champion
from equip.serve.pyfunc import MAX_IMAGE_BYTES, MAX_PIXELS, MAX_ROWS
from equip.serve.request_limit import MAX_REQUEST_BYTES, RequestSizeLimit
from equip.terminal import say

MB = 2**20


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def limits() -> dict[str, int]:
    return {
        "max_images": MAX_ROWS,
        "max_image_mb": MAX_IMAGE_BYTES // MB,
        "max_megapixels": MAX_PIXELS // 10**6,
        "max_request_mb": MAX_REQUEST_BYTES // MB,
    }


def page() -> str:
    return resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def create_app(holder: ModelHolder) -> Any:
    """The ASGI app: FastAPI's routes inside the request size limit. No /docs: FastAPI's docs
    page loads its scripts from a CDN, and the app must work offline."""
    api = FastAPI(title="equip", docs_url=None, redoc_url=None, openapi_url=None)
    _errors_as_one_line(api)
    html = page()

    @api.get("/", response_class=HTMLResponse)
    def index() -> str:
        return html

    @api.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": holder.current.location}

    @api.get("/model")
    def model() -> dict[str, Any]:
        return {**holder.current.describe(), "limits": limits()}

    @api.post("/reload")
    def reload() -> JSONResponse:
        if not follows_champion(holder.uri):
            return error(409, f"model={holder.uri} is one fixed model; nothing to reload")
        try:
            changed = holder.reload()
        except Exception as e:  # no champion now, or the store is away: the model stays served
            say(f"equip app: could not look up {holder.uri}: {first_line(e)}")
            return error(
                503,
                f"no champion of {holder.uri} could be looked up now; still serving "
                f"{holder.current.location} (the server's log says why)",
            )
        return JSONResponse({"changed": changed, **holder.current.describe()})

    @api.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await request.body()  # bounded by RequestSizeLimit
        photos = await run_in_threadpool(read_photos, request.headers.get("content-type", ""), body)
        served = holder.current  # this request's model, whatever a reload swaps in meanwhile
        answers = await run_in_threadpool(classify, served.predict, photos)
        described = served.describe()
        identity = {
            k: described[k] for k in ("uri", "name", "version", "run_id", "run_link", "runtime")
        }
        return JSONResponse({"model": identity, "predictions": answers})

    return RequestSizeLimit(api, MAX_REQUEST_BYTES, error_body=error_body)


def _errors_as_one_line(api: FastAPI) -> None:
    @api.exception_handler(ClientError)
    async def client_error(request: Request, e: ClientError) -> JSONResponse:
        return error(e.status, str(e))

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return error(e.status_code, str(e.detail))  # 404, 405: Starlette's own short words

    @api.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        # Starlette raises it again once this is sent: uvicorn logs the traceback, server-side.
        return error(500, f"the server failed on this request ({type(e).__name__}); see its log")
