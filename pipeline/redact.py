"""Secrets out of logs: what the project prints or sends to MLflow passes through `redact` first.

Masked: the password of a URI (`https://user:TOKEN@host` -> `https://user:****@host`), and the value of
any assignment whose name looks like a credential (`HF_TOKEN=...`, `aws_secret_access_key=...`,
`DB_PASSWORD="..."`, `?api_key=...`), wherever it stands: `slurm.setup`, `slurm.extra_sbatch`, a URI's
query, an error message. What runs is not changed: the jobs and the MLflow client get the real values.

`split_credentials` moves a tracking URI's user and password into MLflow's own variables
(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), so MLflow never holds, and never prints, a URI with
a password in it ("View run at ..." goes to the terminal).
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "****"
_URI_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*):(?P<secret>[^\s/@]+)@")
_SECRET_NAME = r"[A-Za-z0-9_]*(?:TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIALS?)[A-Za-z0-9_]*"
_ASSIGNMENT = re.compile(r"(?P<name>\b" + _SECRET_NAME + r")(?P<eq>=)(?P<secret>\"[^\"]*\"|'[^']*'|[^\s;&|,'\"]+)",
                         re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with URI passwords and credential-like assignments masked."""
    text = _URI_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _ASSIGNMENT.sub(lambda m: f"{m['name']}{m['eq']}{MASK}", text)


def redact_tree(tree: Any) -> Any:
    """A config-like structure (dicts, lists, scalars) with every string redacted."""
    if isinstance(tree, dict):
        return {key: redact_tree(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redact_tree(value) for value in tree)
    return redact(tree) if isinstance(tree, str) else tree


def split_credentials(uri: str) -> str:
    """For an http(s) URI with `user:password@`, put both in MLflow's variables and return the URI without them."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
