"""Web credentials as stored in ``site.toml``: scrypt password hashes and hashed bearer tokens.

Pure functions over strings, so ``Config.check`` can refuse a malformed entry and the web
server can verify a request with the same code. Nothing secret is kept in the clear: a
password is stored as ``scrypt$N$r$p$SALT$HASH`` (RFC 7914; salt and hash in unpadded
base64url), a bearer token as ``sha256$HEX`` (a token is 32 random bytes, so a fast hash is
enough; a password is chosen by a person, so it gets a slow, salted one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from p2pacs.errors import ConfigError

__all__ = [
    "hash_password",
    "hash_token",
    "new_token",
    "password_problem",
    "token_problem",
    "verify_password",
    "verify_token",
]

SCRYPT_N = 1 << 14  # CPU/memory cost: ~16 MiB and ~50 ms per check here (RFC 7914 sec. 2)
SCRYPT_R = 8  # block size (RFC 7914's recommendation)
SCRYPT_P = 1  # parallelism
SCRYPT_MAX_N = 1 << 20  # refuse stored hashes that would take seconds and a GiB to check
SALT_BYTES = 16
HASH_BYTES = 32
TOKEN_BYTES = 32  # a bearer token's entropy


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, cost: tuple[int, int, int], size: int) -> bytes:
    n, r, p = cost
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r + (1 << 20), dklen=size
    )


def hash_password(password: str) -> str:
    """The stored form of ``password`` (a fresh salt every time)."""
    if not password:
        raise ConfigError("an empty password is not allowed")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, (SCRYPT_N, SCRYPT_R, SCRYPT_P), HASH_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def _parse_password(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ConfigError("not a password hash of the form scrypt$N$r$p$SALT$HASH")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise ConfigError("password hash: N, r, p must be numbers, SALT and HASH base64") from None
    if n < 2 or n & (n - 1) or n > SCRYPT_MAX_N or not 0 < r <= 64 or not 0 < p <= 16:
        raise ConfigError(f"password hash: scrypt parameters N={n} r={r} p={p} out of range")
    if len(salt) < 8 or len(digest) < 16:
        raise ConfigError("password hash: salt or hash too short")
    return n, r, p, salt, digest


def password_problem(stored: str) -> str | None:
    """Why ``stored`` is not a usable password hash, or None."""
    try:
        _parse_password(stored)
    except ConfigError as exc:
        return str(exc)
    return None


def verify_password(stored: str, password: str) -> bool:
    """Whether ``password`` matches; slow on purpose (run it off the event loop)."""
    n, r, p, salt, digest = _parse_password(stored)
    return hmac.compare_digest(_scrypt(password, salt, (n, r, p), len(digest)), digest)


def hash_token(token: str) -> str:
    return "sha256$" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> tuple[str, str]:
    """(token to hand to the client once, its stored form)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    return token, hash_token(token)


def token_problem(stored: str) -> str | None:
    kind, sep, digest = stored.partition("$")
    if kind != "sha256" or not sep or len(digest) != 64:
        return "not a token hash of the form sha256$HEX (64 hex digits)"
    try:
        bytes.fromhex(digest)
    except ValueError:
        return "not a token hash of the form sha256$HEX (64 hex digits)"
    return None


def verify_token(stored: str, token: str) -> bool:
    return hmac.compare_digest(hash_token(token), stored)
