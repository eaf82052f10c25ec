"""An mlflow server over HTTP: does it answer, its credentials out of the URI, how long
MLflow's client retries it."""

from __future__ import annotations

import os
import urllib.error
import urllib.parse
import urllib.request


def reachable(uri: str, timeout: float = 2) -> bool:
    """Does an mlflow server answer at `uri`? Any HTTP answer (even 401/404) counts."""
    request = urllib.request.Request(uri.rstrip("/") + "/health")
    user, password = (
        os.environ.get("MLFLOW_TRACKING_USERNAME"),
        os.environ.get("MLFLOW_TRACKING_PASSWORD"),
    )
    if user and password:
        import base64

        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def store_is_down(uri: str) -> bool:
    return uri.startswith(("http://", "https://")) and not reachable(uri)


def move_credentials_to_environment(uri: str) -> str:
    """http://user:pw@host -> http://host, with MLflow's own basic-auth variables set: the
    password never appears in a message, a tag or a child process's command line."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password or "")
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def set_retries(outage_s: float) -> None:
    """MLflow's HTTP client retries with exponential backoff (urllib3: 0, 2, 4, 8… s with factor
    1). Choose the number of retries so that a store that went away is waited for about
    `outage_s` seconds (tracking.outage_s), then the request fails."""
    waited, retries = 0.0, 0
    while waited < outage_s and retries < 30:
        retries += 1
        waited += 0 if retries == 1 else min(2 ** (retries - 1), 120)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
