"""API keys, per-key rate limits and the loopback rule: plain logic, no Ray, no web framework.

Keys are random bearer tokens (`new_key`); only their SHA-256 is kept, in a keys file or an environment
variable, one entry per line (or comma-separated in the variable):

    # name   hash                                                                      optional limits
    alice    sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae   rate_per_s=2 burst=10 max_sessions=50

A 256-bit random token needs no slow password hash: SHA-256 cannot be reversed and guessing is hopeless.
A request's key is found by its hash, so no secret is ever compared byte by byte.

Without any key the server is open **to loopback clients only** (the embedded default, `coact serve` on
127.0.0.1); a request from any other address is refused with 403, whatever the proxy binds. With keys, every
route but the liveness/readiness probes and the static page needs `Authorization: Bearer <key>`.

Rate limits are token buckets per key and per ingress replica (each replica counts its own requests, as
Envoy's local rate limit does): with N ingress replicas a key gets up to N times its rate.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

KEYS_ENV = "COACT_API_KEYS"
KEY_PREFIX = "coact-"
HASH_PREFIX = "sha256:"
_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
LIMIT_FIELDS = ("rate_per_s", "burst", "max_sessions")
ANONYMOUS = "local"  # the owner of sessions created without keys (loopback only)


class KeyFileError(ValueError):
    """A bad keys entry; the message names the source, the line and the field."""


def new_key() -> str:
    """A fresh bearer token (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(secret: str) -> str:
    return HASH_PREFIX + hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    hash: str
    rate_per_s: float | None = None  # None: the config's default
    burst: int | None = None
    max_sessions: int | None = None


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Entries from a keys file's text (or the environment variable's, where commas also separate entries)."""
    keys: list[ApiKey] = []
    lines = text.replace(",", "\n").splitlines() if source.startswith("$") else text.splitlines()
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        parts = line.split()
        if len(parts) < 2:
            raise KeyFileError(f"{where}: expected '<name> sha256:<hex> [rate_per_s=…] [burst=…] [max_sessions=…]'")
        name, digest, *extra = parts
        if not _NAME.match(name):
            raise KeyFileError(f"{where}: name {name!r}: letters, digits and _.@- only, at most 64")
        if not _HASH.match(digest):
            hint = " (that looks like a key itself: store hash_key(key), see `coact keys new`)" \
                if digest.startswith(KEY_PREFIX) else ""
            raise KeyFileError(f"{where}: hash: expected sha256: and 64 lowercase hex digits{hint}")
        limits: dict[str, float | int] = {}
        for item in extra:
            key, sep, value = item.partition("=")
            if not sep or key not in LIMIT_FIELDS:
                raise KeyFileError(f"{where}: {item!r}: expected one of {', '.join(f + '=…' for f in LIMIT_FIELDS)}")
            try:
                number_value = float(value) if key == "rate_per_s" else int(value)
            except ValueError:
                raise KeyFileError(f"{where}: {key}: {value!r} is not a number") from None
            if not (number_value > 0 and math.isfinite(number_value)):
                raise KeyFileError(f"{where}: {key}: must be positive")
            limits[key] = number_value
        keys.append(ApiKey(name, digest, **limits))
    return keys


def load_keys(keys_file: str | None, environ: Mapping[str, str] | None = None) -> list[ApiKey]:
    """The keys of the file (if given) and of $COACT_API_KEYS (if set). Names and hashes must be unique."""
    environ = os.environ if environ is None else environ
    keys: list[ApiKey] = []
    if keys_file:
        path = Path(keys_file).expanduser()
        if not path.is_file():
            raise KeyFileError(f"keys_file {str(path)!r} does not exist")
        keys += parse_keys(path.read_text(encoding="utf-8"), str(path))
    if environ.get(KEYS_ENV):
        keys += parse_keys(environ[KEYS_ENV], f"${KEYS_ENV}")
    for attr in ("name", "hash"):
        seen: set[str] = set()
        for k in keys:
            value = getattr(k, attr)
            if value in seen:
                raise KeyFileError(f"two keys with the same {attr} {value if attr == 'name' else '(hash)'}")
            seen.add(value)
    return keys


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class TokenBucket:
    """`rate` tokens a second up to `burst`; `take()` answers 0 when a token was taken, else the seconds until
    one will be there."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self._clock = float(rate), float(burst), clock
        self._tokens, self._at = float(burst), clock()

    def take(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


@dataclass
class Verdict:
    """Who is calling (`owner`), or why not: status 401/403/429 with an error and, for 429, Retry-After."""

    owner: str | None = None
    status: int = 200
    error: str = ""
    retry_after_s: float | None = None
    max_sessions: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == 200


class Authenticator:
    """Checks one request's Authorization header and client address; counts its key's rate."""

    def __init__(self, keys: list[ApiKey], rate_per_s: float, burst: int, max_sessions: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.by_hash = {k.hash: k for k in keys}
        self.rate_per_s, self.burst, self.max_sessions = rate_per_s, burst, max_sessions
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.by_hash)

    def check(self, authorization: str | None, client_host: str | None) -> Verdict:
        if not self.enabled:
            if is_loopback(client_host):
                return Verdict(owner=ANONYMOUS, max_sessions=self.max_sessions)
            return Verdict(status=403, error=f"this server has no API keys, so it serves loopback clients only "
                                             f"(not {client_host}); configure keys to serve beyond 127.0.0.1")
        scheme, _, token = (authorization or "").strip().partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="coact"'}
        if not authorization:
            return Verdict(status=401, error="missing API key: send the header 'Authorization: Bearer <key>'",
                           headers=challenge)
        if scheme.lower() != "bearer" or not token.strip():
            return Verdict(status=401, error="invalid Authorization header: expected 'Bearer <key>'",
                           headers=challenge)
        key = self.by_hash.get(hash_key(token.strip()))
        if key is None:
            return Verdict(status=401, error="invalid API key", headers=challenge)
        with self._lock:
            bucket = self._buckets.get(key.name)
            if bucket is None:
                bucket = self._buckets[key.name] = TokenBucket(key.rate_per_s or self.rate_per_s,
                                                               key.burst or self.burst, self._clock)
            wait = bucket.take()
        if wait > 0:
            retry = max(1, math.ceil(wait))
            return Verdict(owner=key.name, status=429, retry_after_s=retry,
                           error=f"rate limit of key {key.name!r} exceeded "
                                 f"({bucket.rate:g} requests/s, burst {bucket.burst:g}); retry in {retry} s",
                           headers={"Retry-After": str(retry)})
        return Verdict(owner=key.name, max_sessions=key.max_sessions or self.max_sessions)


# --- the serving replica's gate -------------------------------------------------------------------------
# Serve pickles the ingress's FastAPI app, middleware included, into each replica; the state the middleware
# reads lives here, in an importable module, so the replica's ChatIngress sets the very object it reads.
_GATE: dict = {"auth": Authenticator([], 1.0, 1, 1), "cors": frozenset()}
_CALLER: ContextVar[str] = ContextVar("coact_caller", default=ANONYMOUS)
_CALLER_SESSIONS: ContextVar[int | None] = ContextVar("coact_caller_sessions", default=None)


def configure_gate(authenticator: Authenticator, cors_origins: list[str]) -> None:
    _GATE["auth"], _GATE["cors"] = authenticator, frozenset(cors_origins)


def gate_authenticator() -> Authenticator:
    return _GATE["auth"]


def cors_allowed(origin: str | None) -> bool:
    return bool(origin) and (origin in _GATE["cors"] or "*" in _GATE["cors"])


def set_caller(owner: str, max_sessions: int | None = None) -> None:
    """The request's caller (its key's name, or ANONYMOUS) and its cap on live sessions, for the store calls
    the request makes."""
    _CALLER.set(owner)
    _CALLER_SESSIONS.set(max_sessions)


def caller() -> str:
    return _CALLER.get()


def caller_max_sessions() -> int | None:
    """The caller's cap on live sessions; None for loopback callers without keys (no cap)."""
    return None if _CALLER.get() == ANONYMOUS else _CALLER_SESSIONS.get()
