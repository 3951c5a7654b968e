"""Optional bearer-token authentication for the cloud server (standard library only).

Keys come from a file (one per line; blank lines and ``#`` comments ignored) and/or the environment variable
``ALIGNEDVQ_API_KEYS`` (separated by commas or whitespace). A request carries one as
``Authorization: Bearer <key>``. Keys are kept only as SHA-256 digests, every digest is compared with
`hmac.compare_digest` (no early exit, so the time taken does not depend on which key or how much of it
matched), and no key ever reaches a log or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import ServerConfigError

API_KEYS_ENV = "ALIGNEDVQ_API_KEYS"
MIN_KEY_LENGTH = 16
# RFC 6750 token68 characters: what can appear after "Bearer " in a header.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
KEY_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def _checked(keys: Iterable[str], source: str) -> list[str]:
    checked = []
    for number, key in enumerate(keys, 1):
        if not _KEY_PATTERN.fullmatch(key):
            raise ServerConfigError(f"API key {number} of {source} has characters a bearer token cannot carry; "
                                    f"make keys with {KEY_HINT}")
        if len(key) < MIN_KEY_LENGTH:
            raise ServerConfigError(f"API key {number} of {source} has {len(key)} characters; use at least "
                                    f"{MIN_KEY_LENGTH}, e.g. {KEY_HINT}")
        checked.append(key)
    return checked


def load_api_keys(path: str | os.PathLike | None = None, *,
                  environ: Mapping[str, str] | None = None) -> list[str]:
    """The keys from ``path`` and from ``$ALIGNEDVQ_API_KEYS`` (both, if both are set); ``[]`` if neither.

    Raises `ServerConfigError` for an unreadable or empty file and for malformed or short keys (the message
    gives the key's position, never the key).
    """
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if path is not None:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ServerConfigError(f"cannot read the API key file {path}: {exc}") from exc
        from_file = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not from_file:
            raise ServerConfigError(f"the API key file {path} holds no key")
        keys += _checked(from_file, f"file {path}")
    from_env = environ.get(API_KEYS_ENV, "").strip()
    if from_env:
        keys += _checked(re.split(r"[\s,]+", from_env), f"${API_KEYS_ENV}")
    return keys


class BearerAuth:
    """ASGI middleware: every HTTP request outside ``open_paths`` needs a valid bearer key, or gets a 401 JSON
    error ``{"error": {"type": "unauthorized", ...}}`` before the app sees it (so before any body is read)."""

    def __init__(self, app, *, keys: Iterable[str], open_paths: Iterable[str] = ("/healthz",)):
        self.app = app
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]
        if not self._digests:
            raise ServerConfigError("BearerAuth needs at least one key")
        self.open_paths = frozenset(open_paths)

    def authorized(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        digest = hashlib.sha256(token.strip().encode("latin-1")).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(known, digest)
        return matched

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self.authorized(scope["headers"]):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": {"type": "unauthorized", "message":
                                     "missing or unknown API key; send the header Authorization: Bearer <key>"}})
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="alignedvq"'), (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body.encode()})


__all__ = ["API_KEYS_ENV", "BearerAuth", "load_api_keys"]
