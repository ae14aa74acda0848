"""Credentials never leave the process: ``user:password@`` in any URI is replaced before a value reaches
a manifest, a key input, an MLflow param, a log line or an error message."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

# scheme://userinfo@ : userinfo cannot hold "/", "@" or whitespace unencoded (RFC 3986).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]{0,30}://)(?P<userinfo>[^/@\s]{1,1000})@")
REDACTED = "***"


def redact_uri(text: str) -> str:
    """``http://alice:pw@host/x`` -> ``http://***@host/x``, wherever URIs occur in ``text``."""
    return _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)


def redact(obj: Any) -> Any:
    """The same structure with every string redacted (dicts, lists and tuples walked)."""
    if isinstance(obj, str):
        return redact_uri(obj) if "@" in obj else obj
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v) for v in obj)
    return obj


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without userinfo, user, password): the credentials can then travel by environment
    (MLFLOW_TRACKING_USERNAME/PASSWORD) while every URI MLflow prints or stores is clean."""
    m = _USERINFO.match(uri)
    if m is None:
        return uri, None, None
    user, _, password = m.group("userinfo").partition(":")
    return m.group("scheme") + uri[m.end() :], unquote(user), unquote(password) if password else None
