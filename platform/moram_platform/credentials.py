"""Credentials never reach a log, an MLflow param or tag, a manifest or an error message: the
one place that recognises them, in a URI's user info and in a config key's name."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# A key is a secret when one of its words is (``aws_secret_access_key``, ``hf_token``, ``apiKey``),
# not when a word merely contains one: ``max_new_tokens`` counts tokens, it is no credential.
_SECRET_WORDS = re.compile(r"(?:^|_)(secret|password|passwd|token|credentials?|api_?key|access_?key|private_?key)(?:_|$)",
                           re.IGNORECASE)
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact(value: Any) -> Any:
    """``value`` with the user info of every URI in it masked (``scheme://user:pass@host`` ->
    ``scheme://***@host``); anything but a string is returned as it is."""
    if not isinstance(value, str) or "://" not in value:
        return value
    return _URI.sub(lambda found: _redact_uri(found.group()), value)


def _redact_uri(uri: str) -> str:
    try:
        parts = urlsplit(uri)
        if not (parts.username or parts.password):
            return uri
        port = f":{parts.port}" if parts.port else ""
    except ValueError:                        # a malformed port: mask everything before the host
        return re.sub(r"//[^/]*@", "//***@", uri)
    return urlunsplit(parts._replace(netloc=f"***@{parts.hostname or ''}{port}"))


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential (its words, camelCase split, as ``_``-separated)."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(key)).replace("-", "_").replace(".", "_")
    return _SECRET_WORDS.search(words) is not None
