"""The one path by which secrets are kept out of MLflow and Hydra's output: params, tags, run
names, config artifacts, checkpoint hyper-parameters, error messages, log lines (`SecretFilter`)
and Hydra's saved configs (equip.track.hydra_output) all go through these functions.

A value is secret when its key looks like one (`*password*`, `*_key`, `bearer`…) or when the
value itself looks like one (a connection string's AccountKey=, a SAS signature, a bearer token,
`user:password@` in a URI, even one whose `//` a path join collapsed to `/`), whatever key it
sits under.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

REDACTED = "***"

SECRET_KEY = re.compile(
    r"secret|passw|pwd|token|credential|bearer|signature|auth|(^|[._-])sas($|[._-])|"
    r"(^|[._-])sig($|[._-])|api_?key|access_?key|account_?key|private_?key|[._-]key$|^key$|"
    r"connection_?string|conn_?str",
    re.I,
)
# Secret-looking text inside any value: the match is replaced, the rest kept.
SECRET_IN_VALUE = [
    (re.compile(r"(?<=://)[^/@\s'\"]+@"), f"{REDACTED}@"),  # http://user[:password]@host
    # user:password@ anywhere, also in `http:/u:p@h` (a path join collapsed the `//`); not
    # models:/NAME@ALIAS (no colon) nor IMAGE:TAG@sha256:DIGEST
    (re.compile(r"[^\s/@:'\"=,\[\]{}()]+:[^\s/@'\"]*@(?!sha\d+:)"), f"{REDACTED}@"),
    (
        re.compile(
            r"(?i)\b(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)="
            r"[^;\s'\"]+"
        ),
        rf"\1={REDACTED}",
    ),
    (re.compile(r"(?i)([?&]sig=)[^&\s'\"]+"), rf"\1{REDACTED}"),  # SAS token signature
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}"), rf"\1{REDACTED}"),
]


# `key=value` (or `+key='quoted value'`) inside free text: a Hydra override in a log line.
OVERRIDE_IN_TEXT = re.compile(
    r"(?P<key>[+~]{0,2}[A-Za-z_][\w.\-/@]*)=(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\"]+)"
)


def strip_secrets(text: str) -> str:
    """Cut every secret-looking part out of free text (URIs, connection strings, messages)."""
    for pattern, replacement in SECRET_IN_VALUE:
        text = pattern.sub(replacement, text)
    return text


def _redact_override_match(match: re.Match[str]) -> str:
    key, value = match["key"], match["value"]
    if is_secret_key(key.lstrip("+~")) or SECRET_KEY.search(value):
        return f"{key}={REDACTED}"
    return match[0]


def redact_text(text: str) -> str:
    """Free text that may hold overrides (a launcher's `#0 : a=1 +b.api_key=X` line): a secret
    key's value becomes ***, and secret-looking parts are cut out as by `strip_secrets`."""
    return strip_secrets(OVERRIDE_IN_TEXT.sub(_redact_override_match, text))


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(str(key)))


def redact_value(key: str, value: Any) -> Any:
    """*** for a secret key; secret parts cut out of any other string value."""
    if is_secret_key(key):
        return REDACTED
    return strip_secrets(value) if isinstance(value, str) else value


def redact_tree(node: Any, key: str = "", text: Callable[[str], str] = strip_secrets) -> Any:
    """A nested dict/list with the whole subtree of every secret key replaced by ***, and every
    other string passed through `text` (`redact_text` where strings may hold overrides)."""
    if is_secret_key(key):
        return REDACTED
    if isinstance(node, Mapping):
        return {k: redact_tree(v, str(k), text) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [redact_tree(v, key, text) for v in node]
    return text(node) if isinstance(node, str) else node


def redact(items: Mapping[str, Any]) -> dict[str, Any]:
    return {k: redact_value(k, v) for k, v in items.items()}


def redact_overrides(overrides: Iterable[str]) -> list[str]:
    """Command-line overrides as they may be logged: a secret key's value becomes ***, and so
    does a value that holds a secret key (`+data.auth={api_key:X}`)."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and (is_secret_key(key.lstrip("+~")) or SECRET_KEY.search(value)):
            out.append(f"{key}={REDACTED}")
        else:
            out.append(strip_secrets(o))
    return out


class SecretFilter(logging.Filter):
    """A logging filter (for a handler) that redacts each record's message and traceback.

    Hydra's logging config names it, as
    `filters: {redaction: {(): equip.track.redaction.SecretFilter}}`,
    in conf/hydra/job_logging and conf/hydra/hydra_logging."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True
