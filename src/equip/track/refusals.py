"""A tracking store that answered "no": credentials it does not accept (HTTP 401/403), or a request
it refuses (HTTP 400/404), said in one line that names the request and the fix.

MLflow raises such answers as MlflowException (RestException when the body is MLflow's JSON);
azureml-mlflow's run-history client and azure-identity raise azure-core's exceptions. Which
request it was is read from the traceback: the outermost public function of the store layer
(MLflow's stores, azureml-mlflow's), e.g. `search_runs` or `log_artifact`.
"""

from __future__ import annotations

import re
from types import TracebackType

CREDENTIALS = (401, 403)
REFUSED = (400, 404)
STORE_CODE = re.compile(r"[/\\](mlflow[/\\]store|azureml[/\\]mlflow)[/\\]")
AZURE_CODE = re.compile(r"[/\\](site|dist)-packages[/\\]azure")
ENDPOINT = re.compile(r"API request to endpoint (\S+) failed with error code (\d+)")


def store_refusal(error: BaseException) -> tuple[str, int] | None:
    """(the line to show, the exit code) when `error` is a tracking store's "no", else None.
    Exit 2: credentials to renew; 1: a request equip did not expect to be refused."""
    for e in _chain(error):
        status, answered = _status(e)
        if status in CREDENTIALS or (status is None and answered == "credentials"):
            return _credentials_line(e, status), 2
        if status in REFUSED and answered == "http":
            return _refused_line(e, status), 1
    return None


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _status(e: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, 'http' | 'credentials' | None): what answered, if anyone did."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(e, RestException) or (
        isinstance(e, MlflowException) and ENDPOINT.search(e.message)
    ):
        return e.get_http_status_code(), "http"
    module = type(e).__module__
    if module.startswith("azure.core") or module.startswith("azure.identity"):
        status = getattr(e, "status_code", None)
        if type(e).__name__ in ("ClientAuthenticationError", "CredentialUnavailableError"):
            return status, "credentials"  # no token could be had, or it was refused
        return status, "http" if status else None
    return None, None


def request_kind(e: BaseException) -> str:
    """The store operation that got the answer, e.g. `search_runs` (else its endpoint)."""
    names = [
        frame.f_code.co_name
        for frame in _frames(e.__traceback__)
        if STORE_CODE.search(frame.f_code.co_filename)
    ]
    public = [n for n in names if not n.startswith("_") and n != "<genexpr>"]
    if public:
        return public[0]
    found = ENDPOINT.search(str(e))
    return found.group(1).rsplit("/mlflow/", 1)[-1] if found else "an MLflow"


def _frames(tb: TracebackType | None):
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _first_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e)
    return (str(text).strip().splitlines() or [type(e).__name__])[0][:300]


def _is_azure(e: BaseException) -> bool:
    import mlflow

    azure_frames = any(AZURE_CODE.search(f.f_code.co_filename) for f in _frames(e.__traceback__))
    return azure_frames or mlflow.get_tracking_uri().startswith("azureml:")


def _credentials_line(e: BaseException, status: int | None) -> str:
    what = f"HTTP {status} on {request_kind(e)}" if status else _first_line(e)
    if _is_azure(e):
        return (
            f"the Azure ML workspace did not accept equip's credentials ({what}). Sign in "
            "again with `az login` (a service principal: check AZURE_CLIENT_ID, "
            "AZURE_TENANT_ID, AZURE_CLIENT_SECRET; in an Azure ML job, its token expired)."
        )
    return (
        f"the tracking server did not accept the credentials ({what}). Set "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)."
    )


def _refused_line(e: BaseException, status: int) -> str:
    store = "the Azure ML workspace" if _is_azure(e) else "the tracking store"
    return (
        f"{store} refused a {request_kind(e)} request (HTTP {status}: {_first_line(e)}). "
        "equip does not expect this answer: please report it with this line."
    )
