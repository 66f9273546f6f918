"""Credentials never leave the process: URLs are written and printed without them.

A URL may carry a secret in its userinfo (``http://user:pass@host/x.tar``) or in its query string
(presigned S3/GCS signatures, SAS tokens, ``?token=``). ``redact_url`` replaces those with
``***``; what is left names the same file, so it is also the shard's identity (its id does not
change when a signature is renewed, and ordinary URLs are left as they are). ``redact_text`` does
the same to every URL inside a message (an exception's text quotes the URL it failed on).
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

MASK = "***"

# Query parameters that hold credentials (case-insensitive): S3/GCS presigned URLs, Azure SAS,
# OAuth/API tokens and keys.
SECRET_PARAMS = re.compile(
    r"^(x-amz-(signature|credential|security-token)|x-goog-(signature|credential)|googleaccessid|"
    r"signature|sig|token|access_token|id_token|auth_token|refresh_token|api[-_]?key|key|secret|"
    r"client_secret|password|passwd|pwd|auth|authorization|x-api-key|awsaccesskeyid)$", re.IGNORECASE)

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")
_QUERY_SECRET = re.compile(r"(?P<lead>[?&;](?P<name>[A-Za-z0-9_.-]+)=)(?P<value>[^&#\s'\"<>]*)")


def _mask_query(match: re.Match) -> str:
    if SECRET_PARAMS.match(match["name"]) and match["value"]:
        return match["lead"] + MASK
    return match[0]


def redact_text(text: str) -> str:
    """``text`` with every URL's userinfo and credential query parameters replaced by ``***``."""
    if "@" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: m["scheme"] + MASK + "@", text)
    return _QUERY_SECRET.sub(_mask_query, text) if "=" in text else text


def redact_url(url: str) -> str:
    """The URL without credentials (unchanged when it holds none)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = MASK + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query and any(SECRET_PARAMS.match(name) for name, _ in parse_qsl(query, keep_blank_values=True)):
        query = _QUERY_SECRET.sub(_mask_query, "?" + query)[1:]
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def has_secrets(url: str) -> bool:
    return redact_url(url) != url
