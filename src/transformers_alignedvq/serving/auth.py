"""Optional bearer-token authentication for the cloud server (standard library only).

Keys come from a file (one per line; blank lines and ``#`` comments ignored) and/or the environment variable
``ALIGNEDVQ_API_KEYS`` (separated by commas or whitespace). A request carries one as
``Authorization: Bearer <key>``. Keys are kept only as SHA-256 digests, every digest is compared with
`hmac.compare_digest` (no early exit, so the time taken does not depend on which key or how much of it
matched), and no key ever reaches a log or an error message: `AccessLogRedaction` blanks query-string values in
the access log, where a key sent in a URL by mistake would otherwise land. `ApiKeys.reload` reads the keys
again; `alignedvq serve` does so on SIGHUP (revoking a key needs no restart).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import unquote_plus

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


class ApiKeys:
    """The accepted keys, as SHA-256 digests, and where they came from: `reload` reads the file and the
    environment again (`serve` calls it on SIGHUP), so a key is revoked or added without a restart."""

    def __init__(self, keys: Iterable[str] = (), *, path: str | os.PathLike | None = None,
                 environ: Mapping[str, str] | None = None):
        self.path, self._environ = path, environ
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None) -> "ApiKeys":
        """The keys of `load_api_keys` (file and ``$ALIGNEDVQ_API_KEYS``), reloadable from the same places."""
        return cls(load_api_keys(path, environ=environ), path=path, environ=environ)

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> int:
        """Read the keys again and use them from the next request on; returns how many there are. A file that
        became unreadable, empty or malformed raises `ServerConfigError` and the old keys stay."""
        keys = load_api_keys(self.path, environ=self._environ)
        if not keys:
            raise ServerConfigError("reloading the API keys found none; keeping the previous ones")
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)  # one atomic swap
        return len(keys)

    def matches(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode("latin-1")).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(known, digest)
        return matched


class BearerAuth:
    """ASGI middleware: every HTTP request outside ``open_paths`` needs a valid bearer key, or gets a 401 JSON
    error ``{"error": {"type": "unauthorized", ...}}`` before the app sees it (so before any body is read)."""

    def __init__(self, app, *, keys: Iterable[str] | ApiKeys, open_paths: Iterable[str] = ("/healthz",)):
        self.app = app
        self.keys = keys if isinstance(keys, ApiKeys) else ApiKeys(keys)
        if not len(self.keys):
            raise ServerConfigError("BearerAuth needs at least one key")
        self.open_paths = frozenset(open_paths)

    def authorized(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        value = next((v for k, v in headers if k.lower() == b"authorization"), b"")
        scheme, _, token = value.decode("latin-1").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return self.keys.matches(token.strip())

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


class AccessLogRedaction(logging.Filter):
    """Blanks query-string values in uvicorn's access lines, but for the parameters named in ``keep``: a key
    a client put in the URL (``?api_key=...``) must not land in the log."""

    def __init__(self, keep: Iterable[str] = ()):
        super().__init__()
        self.keep = frozenset(keep)

    def redact(self, path: str) -> str:
        route, sep, query = path.partition("?")
        if not sep:
            return path
        parts = []
        for item in query.split("&"):
            name, eq, _ = item.partition("=")
            parts.append(item if not eq or unquote_plus(name) in self.keep else f"{name}=[redacted]")
        return f"{route}?{'&'.join(parts)}"

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], self.redact(args[2]), *args[3:])
        return True


__all__ = ["API_KEYS_ENV", "AccessLogRedaction", "ApiKeys", "BearerAuth", "load_api_keys"]
