"""The one redaction every output goes through: log lines, error messages, metadata, MLflow tags and
params, and what the UI shows. URIs carry credentials (``postgresql://user:PASSWORD@db/mlflow``,
``http://alice:PASSWORD@mlflow:5000``) and so do a few environment variables; none may reach an
output, where anyone who can read the UI, the event log or the tracking server would see them.
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from collections.abc import Iterator

MASK = "***"
# Variables that hold a secret of their own (not a URI): their values are masked wherever they appear.
SECRET_VARIABLES = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DAGSTER_PG_PASSWORD", "PGPASSWORD",
                    "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
# Variables that hold URIs: their passwords are masked even where a message quotes them decoded.
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_BACKEND_STORE_URI")
# scheme://authority: the authority ends at the first / ? # or whitespace, quote or bracket
_URI = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<authority>[^/?#\s'\"<>()\[\]]*)")
# libpq/SQLAlchemy keyword forms: password=... in a query string or a DSN
_PASSWORD_PARAM = re.compile(r"(?P<key>\b(?:password|passwd|pwd|token|secret)=)(?P<value>[^&\s'\"]+)", re.IGNORECASE)


def _mask_userinfo(match: re.Match) -> str:
    authority = match["authority"]
    if "@" not in authority:
        return match.group(0)
    userinfo, host = authority.rsplit("@", 1)  # a password may hold an unescaped '@'
    user, has_password, _ = userinfo.partition(":")
    return f"{match['scheme']}{user}{':' + MASK if has_password else ''}@{host}"


def redact(text: object) -> str:
    """``text`` with every URI's password, every ``password=`` value and every secret variable's
    value replaced by ``***``; the user name and host stay (they say which server and account)."""
    out = _URI.sub(_mask_userinfo, str(text))
    out = _PASSWORD_PARAM.sub(lambda m: m["key"] + MASK, out)
    for value in _secret_values():
        out = out.replace(value, MASK)
    return out


def _secret_values() -> list[str]:
    values = [os.environ.get(name) or "" for name in SECRET_VARIABLES]
    for name in URI_VARIABLES:
        try:
            password = urllib.parse.urlsplit(os.environ.get(name) or "").password
        except ValueError:
            password = None
        if password:
            values += [password, urllib.parse.unquote(password)]
    # longest first (one may contain another); a one-letter "secret" would mask every such letter
    return sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)


class RedactedError(RuntimeError):
    """An error whose message quoted a secret, re-raised with the secret masked."""


@contextlib.contextmanager
def redacted_errors() -> Iterator[None]:
    """Re-raise an error whose message holds a secret (a library quoting a URI with its password) as
    RedactedError with the message redacted and the original detached; any other error passes as is."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only errors that carry a secret are replaced
        message = f"{type(e).__name__}: {e}"
        if redact(message) == message:
            raise
        raise RedactedError(redact(message)) from None
