"""The workspace's job service as equip uses it: the client (with the compute checked), data
uploads, submission, status reads with retries, cancellation, and one status line per change.
Azure SDK failures become one EquipError line saying what to do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from equip.errors import EquipError
from equip.launchers.azureml.jobs import AzureJob, folder_fingerprint
from equip.terminal import say
from equip.track import store

TERMINAL = {"Completed", "Failed", "Canceled", "NotResponding"}
MAX_POLL_ERRORS = 10  # status reads failing in a row before the launch gives up (and cancels)


class azure_errors:  # noqa: N801  # used as `with azure_errors(what):`
    """Azure SDK failures -> one EquipError line saying what to do."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> bool:
        if error is None or isinstance(error, EquipError | KeyboardInterrupt):
            return False
        name = type(error).__name__
        text = str(error).strip().splitlines()[0] if str(error).strip() else name
        if name in ("ClientAuthenticationError", "CredentialUnavailableError"):
            raise EquipError(
                "no usable Azure credentials: sign in with `az login`, or set AZURE_CLIENT_ID, "
                f"AZURE_TENANT_ID and AZURE_CLIENT_SECRET for a service principal. ({text})"
            ) from None
        if name in ("ServiceRequestError", "ServiceRequestTimeoutError", "ConnectionError"):
            raise EquipError(
                f"cannot reach Azure for {self.what}: {text}. Check the network "
                "or proxy; dry_run=true works offline."
            ) from None
        if name in (
            "HttpResponseError",
            "ResourceNotFoundError",
            "ValidationException",
            "ValidationError",
            "UserErrorException",
        ):
            raise EquipError(f"Azure ML refused {self.what}: {text}") from None
        return False


# Failures of a status read that pass by themselves: the network, and the service's answers
# "too many requests" and "try later" (HTTP 408, 429, 5xx).
TRANSIENT_ERRORS = {
    "ServiceRequestError",
    "ServiceResponseError",
    "ServiceRequestTimeoutError",
    "ServiceResponseTimeoutError",
    "ConnectionError",
    "TimeoutError",
}


def _transient(e: Exception) -> bool:
    if any(kind.__name__ in TRANSIENT_ERRORS for kind in type(e).__mro__):
        return True
    status = getattr(e, "status_code", None)
    return isinstance(status, int) and (status in (408, 429) or status >= 500)


def not_found(e: Exception) -> bool:
    return type(e).__name__ == "ResourceNotFoundError"


def workspace_client(tracking: DictConfig) -> Any:
    """MLClient of the workspace tracking.* names, signed in by azure-identity (az login, a
    service principal or a managed identity; never a browser). Nothing is sent until its first
    request."""
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    sub, group, ws = store.workspace_of(tracking)
    credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
    return MLClient(credential, sub, group, ws)


class JobService:
    """One workspace, one compute: what the launcher and +launch=azureml do with Azure ML."""

    def __init__(self, tracking: DictConfig, compute: str, prefix: str) -> None:
        self.tracking, self.compute, self.prefix = tracking, compute, prefix
        self.poll_errors = 0
        self._client: Any = None
        self._uploaded: dict[Path, str] = {}  # local data folder -> azureml:name:version

    @property
    def client(self) -> Any:
        """MLClient of the tracking workspace, opened on first use (the compute checked)."""
        if self._client is None:
            client = workspace_client(self.tracking)
            ws = client.workspace_name
            with azure_errors(f"workspace {ws}"):
                try:
                    client.compute.get(self.compute)
                except Exception as e:
                    if not not_found(e):
                        raise
                    names = [c.name for c in client.compute.list()]
                    raise EquipError(
                        f"{self.prefix}.compute={self.compute}: no such compute in workspace "
                        f"{ws}. Create it (az ml compute create --type amlcompute --name "
                        f"{self.compute} ...) or use one of: {', '.join(names) or 'none'}."
                    ) from None
            self._client = client
        return self._client

    @client.setter
    def client(self, value: Any) -> None:  # tests: a stand-in job service
        self._client = value

    def data_asset(self, local: Path) -> str:
        """Upload a local data folder once: a data asset versioned by its file list."""
        if local not in self._uploaded:
            from azure.ai.ml.entities import Data

            name = "equip-" + (re.sub(r"[^A-Za-z0-9_-]", "-", local.name)[:40] or "data")
            version = folder_fingerprint(local)[:12]
            with azure_errors(f"data asset {name}"):
                try:
                    asset = self.client.data.get(name, version=version)
                except Exception as e:
                    if not not_found(e):
                        raise
                    say(f"uploading {local} as data asset {name}:{version} (once)")
                    asset = self.client.data.create_or_update(
                        Data(
                            name=name,
                            version=version,
                            path=str(local),
                            type="uri_folder",
                            description=f"equip data.root={local}",
                        )
                    )
            self._uploaded[local] = f"azureml:{asset.name}:{asset.version}"
        return self._uploaded[local]

    def submit(self, j: AzureJob) -> None:
        if j.local_data is not None:
            j.job.inputs["data"].path = self.data_asset(j.local_data)
        with azure_errors(f"job {j.name}"):
            created = self.client.jobs.create_or_update(j.job)
        j.name = getattr(created, "name", None) or j.name
        j.url = getattr(created, "studio_url", "") or ""
        self.report(j, created.status or "Submitted")

    def poll(self, j: AzureJob) -> str:
        """Read the job's status and report a change. A blip (network, throttling, a busy
        service) is retried at the next poll; only MAX_POLL_ERRORS in a row stop the launch.
        Any other failure to read the status stops it at once: it will not pass by itself, and
        a job that failed says so in its status ("Failed"), not by a failing read."""
        try:
            status = self.client.jobs.get(j.name).status
        except Exception as e:
            why = f"{type(e).__name__} {(str(e).strip().splitlines() or [''])[0]}"
            if not _transient(e):
                raise EquipError(
                    f"could not read the status of Azure ML job {j.name}: {why}. Not retried: "
                    "not a network or service blip."
                ) from e
            self.poll_errors += 1
            if self.poll_errors >= MAX_POLL_ERRORS:
                raise EquipError(
                    f"could not read the status of Azure ML job {j.name} "
                    f"{self.poll_errors} times in a row: {why}. Check the "
                    "network and your access."
                ) from None
            say(
                f"could not read the status of {j.name} ({type(e).__name__}); "
                "retrying at the next poll"
            )
            return j.status
        self.poll_errors = 0
        if status != j.status:
            self.report(j, status)
        return status

    def cancel(self, jobs: list[AzureJob]) -> None:
        """Best effort: says which job could not be cancelled (and may still be running)."""
        for j in jobs:
            try:
                self.client.jobs.begin_cancel(j.name)
            except Exception as e:
                say(f"could not cancel {j.name}: {e} ({j.url})")

    @staticmethod
    def report(j: AzureJob, status: str) -> None:
        j.status = status
        say(f"[azureml] #{j.idx} {j.display_name}: {status}  {j.url}")
