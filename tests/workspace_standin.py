"""A stand-in Azure ML workspace: what `tracking=azureml` talks to in the tests, on loopback only.

    workspace = Workspace.start(folder)      # a real `mlflow server` behind an HTTPS front
    env = workspace.environment()            # what a user's shell has after `az login`
    ... python train.py tracking=azureml tracking.subscription_id=… (run with env) ...
    assert workspace.rejected == []          # every request was one a workspace serves

equip reaches it exactly as it reaches a real workspace: through azureml-mlflow's `azureml://`
tracking, registry and artifact stores, with azure-identity's Azure CLI credential. Nothing in
equip or in those libraries is patched; what stands in is what sits across the network:

- the workspace's MLflow API (`/mlflow/v2.0/<workspace scope>/api/2.0/mlflow/…`), served over
  HTTPS with a certificate made by the test: it checks the bearer token, refuses (and logs) what
  the support matrices rule out (tests/workspace_rules.py), and forwards the rest to a real
  `mlflow server`;
- the run-history artifact API azureml-mlflow uploads and downloads run artifacts through
  (`/history/v1.0/<scope>/experiments/<e>/runs/<run>/artifacts…`), which hands out SAS URLs of
  blobs in the workspace's storage account;
- that storage account (`<account>.blob.core.windows.net`) and Azure Resource Manager
  (`management.azure.com`, where equip reads the workspace's MLflow URI). Both are real host names:
  processes reach them through HTTPS_PROXY, a proxy here that tunnels only these two hosts to the
  front (TLS end to end, the same certificate) and refuses and logs any other host, so no test
  request can leave the machine;
- the Azure CLI: an `az` on PATH that prints the token the workspace accepts, the way
  `az account get-access-token` does after `az login` (azure-identity runs it for every token).

The front is Python's http.server with ssl (a few routes; no framework needed), in threads of
the test process, so the tests read its logs directly.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import requests

from tests.conftest import MlflowServer
from tests.workspace_rules import refusal

SUBSCRIPTION = "5f1c8a2e-0000-4000-8000-00000000e9a1"
RESOURCE_GROUP = "rg-equip"
WORKSPACE = "ws-equip"
TENANT = "72f988bf-0000-4000-8000-000000000001"
SCOPE = (
    f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{RESOURCE_GROUP}/providers/"
    f"Microsoft.MachineLearningServices/workspaces/{WORKSPACE}"
)
ARM_HOST = "management.azure.com"
STORAGE_ACCOUNT = "equipstandinstore"
BLOB_HOST = f"{STORAGE_ACCOUNT}.blob.core.windows.net"
TUNNELED = (ARM_HOST, BLOB_HOST)
MLFLOW_API = re.compile(
    r"^/mlflow/v2\.0" + re.escape(SCOPE) + r"(?P<api>/api/[23]\.0/mlflow)/(?P<route>.*)$"
)
HISTORY_API = re.compile(
    r"^/history/v1\.0"
    + re.escape(SCOPE)
    + r"/experiments/[^/]+/runs/(?P<run>[^/]+)/artifacts(?P<rest>/.*)?$"
)
ARM_WORKSPACE = re.compile(
    r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/"
    r"Microsoft\.MachineLearningServices/workspaces/([^/?]+)$"
)


@dataclass(frozen=True)
class Rejected:
    """A request the stand-in refused, as a workspace would."""

    method: str
    route: str
    status: int
    reason: str

    def __str__(self) -> str:
        return f"{self.status} {self.method} {self.route}: {self.reason}"


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def json(status: int, value: object) -> Answer:
        return Answer(status, json.dumps(value).encode(), {"Content-Type": "application/json"})


# ---------------------------------------------------------------- certificate, token, az
def write_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and the two tunnelled hosts; trusting it (the
    test's REQUESTS_CA_BUNDLE / SSL_CERT_FILE) trusts nothing else."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "equip workspace stand-in")])
    now = datetime.datetime.now(datetime.UTC)
    names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([*names, *(x509.DNSName(h) for h in TUNNELED)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "standin-cert.pem", folder / "standin-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def issue_token(lifetime_s: float) -> str:
    """An access token shaped like Entra ID's (a JWT with exp; azureml-mlflow decodes it without
    checking the signature). The stand-in accepts only tokens it issued, while they last."""
    import jwt

    now = int(time.time())
    claims = {
        "aud": "https://management.azure.com",
        "iss": f"https://sts.windows.net/{TENANT}/",
        "tid": TENANT,
        "oid": str(uuid.uuid4()),
        "iat": now,
        "nbf": now,
        "exp": int(now + lifetime_s),
    }
    return jwt.encode(claims, "a signing key of the stand-in, 32+ bytes", algorithm="HS256")


AZ_SCRIPT = """#!/bin/sh
# Stand-in for the Azure CLI: `az account get-access-token` prints the signed-in user's token.
cat '{token_file}' 2>/dev/null && exit 0
echo "ERROR: Please run 'az login' to setup account." >&2
exit 1
"""


# ---------------------------------------------------------------- artifacts and blobs
class ArtifactStore:
    """Run artifacts the way a workspace keeps them: metadata in run history, bytes in blobs of
    the workspace's storage account, reached with per-blob SAS URLs."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes | None] = {}  # "container/blob" -> bytes (None: created)
        self.lock = threading.Lock()
        self.secret = os.urandom(16)

    @staticmethod
    def _blob(run: str, path: str) -> str:
        return f"azureml/ExperimentRun/dcid.{run}/{path}"

    def _sas(self, blob: str) -> str:
        sig = hmac.new(self.secret, blob.encode(), hashlib.sha256).digest()
        return f"sv=2021-08-06&sr=b&sp=rcw&sig={quote(base64.b64encode(sig).decode(), safe='')}"

    def _content(self, run: str, path: str) -> dict[str, str]:
        blob = self._blob(run, path)
        uri = f"https://{BLOB_HOST}/{quote(blob)}?{self._sas(blob)}"
        return {
            "contentUri": uri,
            "origin": "ExperimentRun",
            "container": f"dcid.{run}",
            "path": path,
        }

    def history(self, method: str, run: str, rest: str, query: dict, body: bytes) -> Answer:
        if method == "POST" and rest == "/batch/metadata":
            paths = [p["path"] for p in json.loads(body)["paths"]]
            with self.lock:
                for p in paths:
                    self.blobs.setdefault(self._blob(run, p), None)
            return Answer.json(
                200,
                {
                    "artifacts": {
                        p: {"origin": "ExperimentRun", "container": f"dcid.{run}", "path": p}
                        for p in paths
                    },
                    "artifactContentInformation": {p: self._content(run, p) for p in paths},
                    "errors": {},
                },
            )
        prefix = self._blob(run, "")
        with self.lock:
            paths = sorted(b.removeprefix(prefix) for b in self.blobs if b.startswith(prefix))
        if method == "GET" and not rest:
            value = [
                {
                    "artifactId": f"ExperimentRun/dcid.{run}/{p}",
                    "origin": "ExperimentRun",
                    "container": f"dcid.{run}",
                    "path": p,
                }
                for p in paths
            ]
            return Answer.json(200, {"value": value, "continuationToken": None, "nextLink": None})
        if method == "GET" and rest == "/contentinfo":
            path = query.get("path", "")
            if path not in paths:
                return Answer.json(
                    404, {"error": {"code": "UserError", "message": f"artifact {path} not found"}}
                )
            return Answer.json(200, self._content(run, path))
        return Answer(404)

    def blob(self, method: str, path: str, query: dict, headers, body: bytes) -> Answer:
        blob = unquote(path.lstrip("/"))
        expected = parse_qs(self._sas(blob))["sig"][0]
        if not hmac.compare_digest(query.get("sig", ""), expected):
            return Answer(403, b"", {"x-ms-error-code": "AuthenticationFailed"})
        stamp = {
            "ETag": f'"0x{abs(hash(blob)):X}"',
            "Last-Modified": _http_date(),
            "x-ms-version": "2021-08-06",
        }
        if method == "PUT":
            with self.lock:
                self.blobs[blob] = body
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
            return Answer(
                201, b"", {**stamp, "Content-MD5": md5, "x-ms-request-server-encrypted": "true"}
            )
        with self.lock:
            data = self.blobs.get(blob)
        if data is None:
            return Answer(404, b"", {"x-ms-error-code": "BlobNotFound"})
        stamp |= {
            "x-ms-blob-type": "BlockBlob",
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        asked = headers.get("x-ms-range") or headers.get("Range")
        if not asked:
            return Answer(200, data if method == "GET" else b"", stamp)
        if not data:
            return Answer(
                416, b"", {"Content-Range": "bytes */0", "x-ms-error-code": "InvalidRange"}
            )
        start, _, end = asked.removeprefix("bytes=").partition("-")
        first, last = int(start), min(int(end or len(data) - 1), len(data) - 1)
        part = data[first : last + 1]
        return Answer(206, part, {**stamp, "Content-Range": f"bytes {first}-{last}/{len(data)}"})


def _http_date() -> str:
    from email.utils import formatdate

    return formatdate(usegmt=True)


# ---------------------------------------------------------------- the HTTPS front
class FrontHandler(BaseHTTPRequestHandler):
    """One connection to the front: the workspace's own address, or a tunnelled host."""

    protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's and Azure's clients expect
    server: FrontServer
    tunnel_host: str | None = None

    def do_CONNECT(self) -> None:  # noqa: N802  (only on the proxy listener)
        host = self.path.rsplit(":", 1)[0]
        if not self.server.is_proxy or host not in TUNNELED:
            self.server.workspace.refuse_host(host)
            self._send(Answer(403))
            self.close_connection = True
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        tls = self.server.workspace.tls.wrap_socket(self.connection, server_side=True)
        handler = type("Tunnel", (FrontHandler,), {"tunnel_host": host})
        handler(tls, self.client_address, self.server)

    def _dispatch(self) -> None:
        if self.server.is_proxy and self.tunnel_host is None:  # plain HTTP through the proxy
            self.server.workspace.refuse_host(urlsplit(self.path).hostname or self.path)
            self._send(Answer(403))
            return
        size = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(size) if size else self._chunked()
        try:
            answer = self.server.workspace.answer(
                self.tunnel_host, self.command, self.path, self.headers, body
            )
        except Exception as e:  # the stand-in's own bug: a 500 the test will see
            self.server.workspace.errors.append(f"{self.command} {self.path}: {e!r}")
            answer = Answer.json(500, {"error_code": "INTERNAL_ERROR", "message": repr(e)})
        self._send(answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _dispatch

    def _chunked(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return b""
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(parts)

    def _send(self, answer: Answer) -> None:
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(answer.body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the workspace keeps its own log


class FrontServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, workspace: Workspace, is_proxy: bool) -> None:
        self.workspace, self.is_proxy = workspace, is_proxy
        super().__init__(("127.0.0.1", 0), FrontHandler)

    def finish_request(self, request, client_address) -> None:
        """TLS in the connection's own thread: one slow handshake holds up no one else."""
        if not self.is_proxy:
            request = self.workspace.tls.wrap_socket(request, server_side=True)
        super().finish_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hangs up mid-handshake (a killed job) is not the test's failure

    @property
    def port(self) -> int:
        return self.server_address[1]


# ---------------------------------------------------------------- the workspace
class Workspace:
    """The stand-in (see the module docstring). `rejected`: every request refused as a workspace
    would; `seen`: every request, as 'METHOD route'; `errors`: the stand-in's own failures."""

    def __init__(self, folder: Path, backend: MlflowServer, enforce: bool = True) -> None:
        self.folder, self.backend, self.enforce = folder, backend, enforce
        cert, key = write_certificate(folder)
        self.ca_bundle = cert
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(cert, key)
        self.rejected: list[Rejected] = []
        self.seen: list[str] = []
        self.errors: list[str] = []
        self.tokens: set[str] = set()  # accepted now
        self.used_tokens: set[str] = set()  # presented by authorised requests
        self.surprises: dict[str, str] = {}  # route -> why its next request is refused
        self.artifacts = ArtifactStore()
        self.local = threading.local()
        self.front = FrontServer(self, is_proxy=False)
        self.proxy = FrontServer(self, is_proxy=True)
        for server in (self.front, self.proxy):
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.login()

    @classmethod
    def start(cls, folder: Path, enforce: bool = True) -> Workspace:
        """enforce=False: a refused request is logged, then served anyway (to list everything a
        flow would have refused in one pass, instead of stopping at the first)."""
        backend = MlflowServer(folder / "backend")
        backend.wait()
        return cls(folder, backend, enforce)

    def stop(self) -> None:
        for server in (self.front, self.proxy):
            server.shutdown()
            server.server_close()
        self.backend.stop()

    # ------------------------------------------------------------ what users see
    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.front.port}"

    @property
    def uri(self) -> str:
        """The workspace's MLflow tracking URI, as Azure reports it (mlFlowTrackingUri)."""
        return f"azureml://{self.host}/mlflow/v1.0{SCOPE}"

    def settings(self) -> list[str]:
        """The overrides a user gives train.py: the workspace by its names."""
        return [
            "tracking=azureml",
            f"tracking.subscription_id={SUBSCRIPTION}",
            f"tracking.resource_group={RESOURCE_GROUP}",
            f"tracking.workspace_name={WORKSPACE}",
        ]

    def environment(self) -> dict[str, str]:
        """What a user's shell has after `az login`, on a machine whose network is this test:
        the Azure CLI on PATH, the test's certificate trusted, other hosts behind the proxy."""
        bin_dir = self.folder / "bin"
        return {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            # azure-identity's default chain, cut to the Azure CLI (no managed-identity probe)
            "AZURE_TOKEN_CREDENTIALS": "AzureCliCredential",
            # the cloud by name: azureml-mlflow would otherwise fetch its metadata from ARM
            "AZUREML_CURRENT_CLOUD": "AzureCloud",
            "REQUESTS_CA_BUNDLE": str(self.ca_bundle),
            "SSL_CERT_FILE": str(self.ca_bundle),
            "HTTPS_PROXY": f"http://127.0.0.1:{self.proxy.port}",
            "NO_PROXY": "127.0.0.1,localhost",
            # MLflow 3's usage telemetry is no part of the workspace (the proxy would refuse it)
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }

    def issue(self, lifetime_s: float = 3600) -> str:
        """A token the workspace accepts (as Azure ML hands a job its MLFLOW_TRACKING_TOKEN)."""
        token = issue_token(lifetime_s)
        self.tokens.add(token)
        return token

    def login(self, lifetime_s: float = 3600) -> str:
        """`az login`: the CLI now prints a fresh token, which the workspace accepts."""
        token = self.issue(lifetime_s)
        bin_dir = self.folder / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        token_file = self.folder / "az-token.json"
        expires = int(time.time() + lifetime_s)
        token_file.write_text(
            json.dumps(
                {
                    "accessToken": token,
                    "expires_on": expires,
                    "subscription": SUBSCRIPTION,
                    "tenant": TENANT,
                    "tokenType": "Bearer",
                    "expiresOn": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.localtime(expires)),
                }
            )
        )
        az = bin_dir / "az"
        az.write_text(AZ_SCRIPT.format(token_file=token_file))
        az.chmod(0o755)
        return token

    def revoke(self) -> None:
        """Tokens issued so far stop working (expired, or the user lost access)."""
        self.tokens.clear()

    def logout(self) -> None:
        """`az logout`: the CLI has no account any more."""
        (self.folder / "az-token.json").unlink(missing_ok=True)

    def refuse_next(self, route: str, reason: str) -> None:
        """Answer the next `route` request 400 although the rules allow it: a workspace that
        says no where equip does not expect it."""
        self.surprises[route] = reason

    # ------------------------------------------------------------ answering
    def refuse_host(self, host: str) -> None:
        self.rejected.append(Rejected("CONNECT", host, 403, "a host outside the stand-in"))

    def answer(self, tunnel: str | None, method: str, target: str, headers, body: bytes) -> Answer:
        parts = urlsplit(target)
        query = {k: v[0] if len(v) == 1 else v for k, v in parse_qs(parts.query).items()}
        if tunnel == BLOB_HOST:
            return self.artifacts.blob(method, parts.path, query, headers, body)
        token = headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not self._authorized(token):
            return self._refuse(method, parts.path, 401, "no valid bearer token", b"")
        self.used_tokens.add(token)
        if tunnel == ARM_HOST:
            return self._arm(method, parts.path)
        if m := MLFLOW_API.match(parts.path):
            return self._mlflow(method, m["api"], m["route"], parts.query, query, body)
        if m := HISTORY_API.match(parts.path):
            self.seen.append(f"{method} history{m['rest'] or ''}")
            return self.artifacts.history(method, m["run"], m["rest"] or "", query, body)
        return self._refuse(method, parts.path, 404, "no such route in a workspace", b"")

    def _authorized(self, token: str) -> bool:
        import jwt

        if token not in self.tokens:
            return False
        claims = jwt.decode(token, options={"verify_signature": False})
        return claims["exp"] > time.time()

    def _refuse(self, method: str, route: str, status: int, reason: str, body=None) -> Answer:
        route = re.sub(r"/m-[0-9a-f]{32}", "/m-ID", route)  # one entry per kind of request
        self.rejected.append(Rejected(method, route, status, reason))
        if body is None:
            return Answer.json(status, {"error_code": "BAD_REQUEST", "message": reason})
        return Answer(status, body, {"WWW-Authenticate": "Bearer"} if status == 401 else {})

    def _arm(self, method: str, path: str) -> Answer:
        m = ARM_WORKSPACE.match(path)
        if method != "GET" or not m or m.groups() != (SUBSCRIPTION, RESOURCE_GROUP, WORKSPACE):
            code = {"code": "ResourceNotFound", "message": f"{path} was not found."}
            return Answer.json(404, {"error": code})
        props = {"mlFlowTrackingUri": self.uri, "discoveryUrl": f"https://{self.host}/discovery"}
        return Answer.json(200, {"id": SCOPE, "name": WORKSPACE, "properties": props})

    def _mlflow(
        self, method: str, api: str, route: str, raw_query: str, query: dict, body: bytes
    ) -> Answer:
        self.seen.append(f"{method} {route}")
        request = json.loads(body) if body.strip().startswith(b"{") else query
        refused = refusal(method, route, request)
        if surprise := self.surprises.pop(route, None):
            return self._refuse(method, route, 400, surprise)
        if refused is not None:
            empty = b"" if refused.status == 404 else None
            answer = self._refuse(method, route, refused.status, refused.reason, empty)
            if self.enforce:
                return answer
        if route == "experiments/create" and not request.get("artifact_location"):
            # As in a workspace: a run's artifacts live in run history (azureml://…/runs/ID).
            body = json.dumps({**request, "artifact_location": self._artifact_root()}).encode()
        session = getattr(self.local, "session", None) or requests.Session()
        session.trust_env, self.local.session = False, session
        upstream = session.request(
            method,
            f"{self.backend.uri}{api}/{route}",
            params=raw_query or None,
            data=body or None,
            headers={"Content-Type": "application/json"} if body else {},
            timeout=120,
        )
        kind = upstream.headers.get("Content-Type", "application/json")
        return Answer(upstream.status_code, upstream.content, {"Content-Type": kind})

    def _artifact_root(self) -> str:
        return f"azureml://{self.host}/mlflow/v2.0{SCOPE}/experiments/{uuid.uuid4()}/runs"
