"""The Ray cluster as the driver sees it: whether its nodes can write to the tracking store,
the connection, and how many jobs it runs at once."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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


# Ray's own connection settings, for joining a cluster at an address. Its defaults try 20 times,
# about 40 s each (13 minutes for an address nobody answers, after rewriting 127.0.0.1 to this
# machine's address); these make it one try of about 12 s. A user's own value in the
# environment wins.
BOUNDED_CONNECT = {
    "RAY_gcs_server_port_wait_time_s": "1",  # connection attempts to the GCS (default 20)
    "RAY_gcs_rpc_server_connect_timeout_s": "3",  # each channel's connect (default 5)
    "RAY_py_gcs_connect_timeout_s": "5",  # the wait for the cluster's id (default 30)
    "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "8",  # ray://: 3 tries of 5, 8, 8 s (default 5-15)
}


def connect(init: DictConfig | dict) -> Any:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each job's own "done ..." line, no "[repeated]"
    kwargs = {k: v for k, v in plain(init).items() if v is not None}
    address = kwargs.get("address")
    joining = address_host(address) is not None
    if joining:
        for name, value in BOUNDED_CONNECT.items():
            os.environ.setdefault(name, value)
    import ray

    if not ray.is_initialized():
        if not joining and address != "auto":
            kwargs.setdefault("include_dashboard", False)  # a local instance for this sweep
        kwargs.setdefault("log_to_driver", True)
        try:
            with ray_output_kept_back(joining):
                ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [""])[0]
            if joining:
                fail(
                    f"cannot reach the Ray cluster at hydra.launcher.ray.init.address={address} "
                    f"({first}). Start it (ray start --head --port=6379), fix the address, or "
                    "leave it out for a local Ray instance.",
                    2,
                )
            fail(f"cannot start Ray ({address or 'a local instance'}): {first}", 2)
    return ray


@contextmanager
def ray_output_kept_back(keep_back: bool) -> Iterator[None]:
    """While joining a cluster, Ray's C++ client writes every failed attempt straight to file
    descriptor 2, which no Python logging setting reaches: hold the descriptor's output in a
    file, and pass it on only if the connection succeeds (a failure is then equip's one line)."""
    if not keep_back:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))


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
