"""Credentials: what never leaves the process that holds them, and how Ray workers get them.

Secrets are never put into Ray's runtime_env (the cluster stores it and its dashboard shows it), printed, logged as
MLflow params or tags, or written into run or checkpoint files:

- **URIs** with ``user:password@`` are shown and stored as ``redact_uri`` gives them (``***@host``).
- **Workers on a real cluster** read credentials from their own environment, as clusters provision nodes (an IAM
  role, a Kubernetes Secret, the node's profile): ``ray.credentials=environment``.
- **A local cluster** (one started by the driver, or on this machine's loopback): the driver writes the secret
  variables it holds to a file only its user can read (0600, in a 0700 directory) and passes only the file's path
  (``EXPBLIP_CREDENTIALS_FILE``); each worker loads it at start-up: ``ray.credentials=file``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

CREDENTIALS_FILE_ENV = "EXPBLIP_CREDENTIALS_FILE"
# Variables whose values are secrets: they travel in a credentials file or a node's own environment, never elsewhere.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH")


def redact_uri(uri: str) -> str:
    """The URI with any ``user:password@`` replaced by ``***@``: what may be shown, logged or stored."""
    parts = urlparse(uri)
    if not parts.username and not parts.password:
        return uri
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()


def unredact_uri(stored: str, environ: dict | None = None) -> str:
    """A URI stored redacted, usable again: $MLFLOW_TRACKING_URI when it is the same URI with its password, else the
    URI without user info (MLflow then authenticates with $MLFLOW_TRACKING_USERNAME / PASSWORD)."""
    environ = os.environ if environ is None else environ
    if "***@" not in stored:
        return stored
    full = environ.get("MLFLOW_TRACKING_URI", "")
    return full if full and redact_uri(full) == stored else stored.replace("***@", "", 1)


def has_userinfo(uri: str) -> bool:
    parts = urlparse(uri)
    return bool(parts.username or parts.password)


def secret_env(environ: dict | None = None) -> dict[str, str]:
    """The secret variables of ``environ`` (default: this process's), including a tracking URI with a password."""
    environ = os.environ if environ is None else environ
    found = {k: environ[k] for k in SECRET_ENV if environ.get(k)}
    if has_userinfo(environ.get("MLFLOW_TRACKING_URI", "")):
        found["MLFLOW_TRACKING_URI"] = environ["MLFLOW_TRACKING_URI"]
    return found


def write_credentials(values: dict[str, str]) -> Path:
    """A new file readable by this user only (0600 in a 0700 directory) holding ``values``; the caller removes it
    (``remove_credentials``) when the workers are done."""
    directory = Path(tempfile.mkdtemp(prefix="expblip-credentials-"))  # mkdtemp: mode 0700
    path = directory / "credentials.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return path


def remove_credentials(path: Path) -> None:
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def load_credentials(path: str | None = None, environ: dict | None = None) -> list[str]:
    """In a worker: put the variables of the credentials file ``path`` (default: $EXPBLIP_CREDENTIALS_FILE) into
    ``environ`` (default: this process's). Returns their names (never values). No file named: nothing to do."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(CREDENTIALS_FILE_ENV)
    if not path:
        return []
    try:
        values = json.loads(Path(path).read_text())
    except OSError as err:
        raise RuntimeError(f"the credentials file {path} is not readable here ({type(err).__name__}): it only exists "
                           "on the driver's machine. On a cluster of several machines use ray.credentials=environment "
                           "and provision the nodes' own credentials") from None
    environ.update(values)
    return sorted(values)


def strip_userinfo(uri: str) -> str:
    """The URI without ``user:password@``."""
    parts = urlparse(uri)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl() if "@" in parts.netloc else uri
