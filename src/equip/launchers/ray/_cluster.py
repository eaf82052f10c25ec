"""The Ray cluster as the driver sees it: whether its nodes can write to the tracking store,
the connection, and how many jobs it runs at once."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from equip.terminal import fail


def is_local_store(uri: str) -> bool:
    """A store only this machine can write to: sqlite, a file store, a plain path."""
    scheme = urlsplit(uri).scheme.lower()
    return scheme in ("", "file", "sqlite") or len(scheme) == 1  # "C:\..." is a path too


def is_local_host(host: str) -> bool:
    """True when `host` is this machine (loopback, its name, or one of its addresses)."""
    if host in ("", "localhost") or host.startswith("127.") or host == "::1":
        return True
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    if ip.startswith("127."):
        return True
    with socket.socket() as s:  # an address of this machine is the only one we can bind to
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def address_host(address: str | None) -> str | None:
    """The host of a Ray address (`HOST:PORT`, `ray://HOST:PORT`); None for a local instance."""
    if not address or address in ("local", "auto"):
        return None
    if "://" not in address:
        address = "ray://" + address
    return urlsplit(address).hostname or ""


def store_refusal(uri: str, hosts: Sequence[str]) -> str | None:
    """Why the jobs on `hosts` could not log to `uri`, or None when they can."""
    remote = [h for h in hosts if not is_local_host(h)]
    if not remote or not uri or not is_local_store(uri):
        return None
    return (
        f"tracking store {uri} is on this machine only, but the Ray cluster has nodes on "
        f"{', '.join(sorted(set(remote)))}: use an mlflow server URI: mlflow server --host "
        "0.0.0.0 --port 5000 --backend-store-uri sqlite:///mlflow.db --artifacts-destination "
        "./mlartifacts, and tracking.uri=http://THIS_HOST:5000"
    )


def connect(init: DictConfig | dict) -> Any:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each job's own "done ..." line, no "[repeated]"
    import ray

    if not ray.is_initialized():
        kwargs = {k: v for k, v in plain(init).items() if v is not None}
        if address_host(kwargs.get("address")) is None and kwargs.get("address") != "auto":
            kwargs.setdefault("include_dashboard", False)  # a local instance for this sweep
        kwargs.setdefault("log_to_driver", True)
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = kwargs.get("address") or "a local instance"
            fail(f"cannot start or reach Ray ({where}): {e}", 2)
    return ray


def slots(resources: dict[str, float], remote: dict[str, Any]) -> int:
    """How many jobs the cluster runs at once."""
    need = {"CPU": remote.get("num_cpus") or 0, "GPU": remote.get("num_gpus") or 0}
    fits = [int(resources.get(r, 0) // n) for r, n in need.items() if n > 0]
    return max(1, min([*fits, 64]))


def plain(node: Any) -> dict[str, Any]:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    return dict(node)
