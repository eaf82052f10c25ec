"""What a `POST /predict` carries, read within equip.serve's bounds, and what it is answered.

Two forms: multipart/form-data with the photos in the field `files` (one or many: what the page
and `curl -F files=@photo.jpg` send), or JSON `{"images": ["<base64>", ...]}` (what MLflow's
scoring server takes, without the DataFrame around it). Every refusal is a `ClientError`: an
HTTP status and one line that names the photo by the client's own file name, never the server's
paths.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from equip.serve.pyfunc import IMAGE_COLUMN, MAX_IMAGE_BYTES, MAX_ROWS

FIELD = "files"  # the multipart field of the photos
TOP = 3  # classes shown per photo


class ClientError(Exception):
    """A request the client must change: `status` (4xx) and one line."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Photo:
    name: str  # the client's file name (no folders), or "image N" for JSON
    image: str  # base64, as equip's pyfunc takes it


def read_photos(content_type: str, body: bytes) -> list[Photo]:
    """The request's photos, refused before any decoding when the request is malformed, holds
    none or more than MAX_ROWS, or holds a file over MAX_IMAGE_BYTES."""
    from werkzeug.http import parse_options_header

    mimetype, options = parse_options_header(content_type)
    if mimetype == "multipart/form-data":
        photos = _multipart(body, options)
    elif mimetype == "application/json":
        photos = _json(body)
    else:
        raise ClientError(
            415,
            f"send the photos as multipart/form-data (field {FIELD!r}) or as JSON "
            '{"images": ["<base64>", ...]}, not ' + (mimetype or "a body without a Content-Type"),
        )
    if not photos:
        raise ClientError(400, "the request holds no photos")
    if len(photos) > MAX_ROWS:
        raise ClientError(400, f"{len(photos)} photos in one request; send at most {MAX_ROWS}")
    return photos


def _multipart(body: bytes, options: dict[str, str]) -> list[Photo]:
    """Parsed by Werkzeug's multipart parser (installed with MLflow's Flask): Starlette's own
    form parsing needs python-multipart, which MLflow does not install."""
    from werkzeug.formparser import FormDataParser

    parser = FormDataParser(max_form_memory_size=2**20, max_form_parts=MAX_ROWS + 16)
    try:
        _, form, files = parser.parse(io.BytesIO(body), "multipart/form-data", len(body), options)
    except Exception:  # Werkzeug's own refusals (too many parts, a form field too large)
        raise ClientError(400, "the multipart body could not be read") from None
    uploads = files.getlist(FIELD)
    if not uploads:
        got = sorted({*files.keys(), *form.keys()})
        found = f"; the request has {', '.join(map(repr, got))}" if got else ""
        raise ClientError(400, f"send the photos in the multipart field {FIELD!r}{found}")
    if len(uploads) > MAX_ROWS:
        raise ClientError(400, f"{len(uploads)} photos in one request; send at most {MAX_ROWS}")
    photos = []
    for i, upload in enumerate(uploads):
        name = PurePath((upload.filename or "").replace("\\", "/")).name or f"image {i}"
        data = upload.stream.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise ClientError(413, f"{name}: larger than {MAX_IMAGE_BYTES // 2**20} MB")
        photos.append(Photo(name[:120], base64.b64encode(data).decode()))
    return photos


def _json(body: bytes) -> list[Photo]:
    try:
        payload = json.loads(body)
    except ValueError:
        raise ClientError(400, "the body is not valid JSON") from None
    images = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(images, list) or not all(isinstance(v, str) for v in images):
        raise ClientError(400, 'send JSON {"images": ["<base64>", ...]}')
    return [Photo(f"image {i}", value) for i, value in enumerate(images)]


IMAGE_INDEX = re.compile(r"^(?:image|row) (\d+)")


def classify(predict: Any, photos: list[Photo]) -> list[dict[str, Any]]:
    """The model's answer per photo: its class, probability and the top classes. The model's
    own refusal of a photo (not an image, too many pixels) is a ClientError naming it."""
    import pandas as pd
    from mlflow.exceptions import MlflowException

    try:
        out = predict(pd.DataFrame({IMAGE_COLUMN: [p.image for p in photos]}))
    except MlflowException as e:
        if e.error_code != "INVALID_PARAMETER_VALUE":
            raise
        message = e.message.splitlines()[0] if e.message else "the photo was refused"
        index = IMAGE_INDEX.match(message)
        if index and int(index[1]) < len(photos):
            message = photos[int(index[1])].name + message[index.end() :]  # names the file
        raise ClientError(400, message) from None
    return [_answer(photo, row) for photo, (_, row) in zip(photos, out.iterrows(), strict=True)]


def _answer(photo: Photo, row: Any) -> dict[str, Any]:
    probs = {k.removeprefix("p_"): float(v) for k, v in row.items() if str(k).startswith("p_")}
    # Python's sort is stable: classes of equal probability keep the model's order, as argmax.
    top = sorted(probs.items(), key=lambda kv: -kv[1])[:TOP]
    return {
        "name": photo.name,
        "class": str(row["class"]),
        "probability": float(row["probability"]),
        "top": [{"class": c, "probability": p} for c, p in top],
    }
