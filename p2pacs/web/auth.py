"""Who may use the site's web server: bearer tokens and HTTP Basic users from ``[web]``.

A request without valid credentials is answered 401 with a ``WWW-Authenticate`` challenge per
scheme configured (RFC 7235, RFC 7617 Basic, RFC 6750 Bearer), and told to the site's event
bus as ``SecurityAlert(kind="auth-failed")`` for the audit trail. A password check runs scrypt
(~50 ms of CPU), so it runs on a worker thread, at most ``MAX_CHECKS`` at once, and a password
that passed is remembered (by a keyed hash, never in the clear) for ``REMEMBER_S`` so a page
refreshing every few seconds does not pay for scrypt each time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from p2pacs import credentials
from p2pacs.config import WebConfig
from p2pacs.events import EventBus, SecurityAlert, UserAuthentication

__all__ = ["PRINCIPAL", "Authenticator", "Refusal", "parse_authorization"]

log = logging.getLogger(__name__)

REALM = "p2pacs"
MAX_CHECKS = 2  # scrypt checks at once: a flood of wrong passwords cannot take every core
REMEMBER_S = 300.0  # seconds a checked password is remembered
REMEMBER_MAX = 256  # remembered passwords (users x browsers); the oldest goes first
LOG_INTERVAL = 60.0  # seconds between log lines about refused requests from one address
PRINCIPAL = web.RequestKey("principal", str)  # request key: who was let in ("user:NAME", "token:N")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request was refused, for the 401 body and the security alert."""

    reason: str


def parse_authorization(header: str) -> tuple[str, str, str] | Refusal:
    """``(scheme, name, secret)`` from an ``Authorization`` header: ``("basic", user,
    password)`` or ``("bearer", "", token)``; a ``Refusal`` when it cannot be read."""
    scheme, _, value = header.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer" and value:
        return "bearer", "", value
    if scheme == "basic" and value:
        try:
            text = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return Refusal("malformed Basic credentials")
        user, sep, password = text.partition(":")
        if not sep:
            return Refusal("malformed Basic credentials")
        return "basic", user, password
    return Refusal(f"unsupported authorization scheme {scheme[:20]!r}")


class Authenticator:
    """Checks every request against the ``[web]`` users and tokens (an aiohttp middleware)."""

    def __init__(self, config: WebConfig, events: EventBus):
        self.users = dict(config.users)
        self.tokens = dict(config.tokens)
        self.events = events
        self.refused = 0
        self._checks = asyncio.Semaphore(MAX_CHECKS)
        self._key = secrets.token_bytes(32)  # keys the remembered-password digests
        self._remembered: dict[bytes, float] = {}
        self._sessions: dict[tuple[str, str], float] = {}  # (principal, address) -> until
        self._last_log: dict[str, float] = {}

    def challenges(self) -> list[str]:
        out = []
        if self.users:
            out.append(f'Basic realm="{REALM}", charset="UTF-8"')
        if self.tokens:
            out.append(f'Bearer realm="{REALM}"')
        return out

    async def principal(self, header: str | None) -> str | Refusal:
        """Who the ``Authorization`` header proves the caller is, or why not."""
        if not header:
            return Refusal("no credentials")
        parsed = parse_authorization(header)
        if isinstance(parsed, Refusal):
            return parsed
        scheme, name, secret = parsed
        if scheme == "bearer":
            for token_name, stored in self.tokens.items():
                if credentials.verify_token(stored, secret):
                    return f"token:{token_name}"
            return Refusal("unknown bearer token")
        password_hash = self.users.get(name)
        if password_hash is None:
            return Refusal(f"unknown user {name[:64]!r}")
        if await self._password_ok(name, password_hash, secret):
            return f"user:{name}"
        return Refusal(f"wrong password for user {name[:64]!r}")

    async def _password_ok(self, name: str, stored: str, password: str) -> bool:
        key = hashlib.blake2b(
            f"{name}\0{password}".encode(), key=self._key, digest_size=32
        ).digest()
        now = time.monotonic()
        if self._remembered.get(key, 0.0) > now:
            return True
        async with self._checks:
            ok = await asyncio.to_thread(credentials.verify_password, stored, password)
        if ok:
            if len(self._remembered) >= REMEMBER_MAX:
                self._remembered.pop(next(iter(self._remembered)))
            self._remembered[key] = now + REMEMBER_S
        return ok

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        found = await self.principal(request.headers.get("Authorization"))
        if isinstance(found, Refusal):
            raise self._refuse(request, found)
        request[PRINCIPAL] = found
        self._logged_in(found, request.remote or "")
        return await handler(request)

    def _logged_in(self, principal: str, address: str) -> None:
        """One User Authentication event per principal and address every ``REMEMBER_S``
        (PS3.15 A.5.3.13: a login, not every request of a page that refreshes itself)."""
        now = time.monotonic()
        key = (principal, address)
        if self._sessions.get(key, 0.0) > now:
            return
        if len(self._sessions) >= REMEMBER_MAX:
            self._sessions = {k: t for k, t in self._sessions.items() if t > now}
            if len(self._sessions) >= REMEMBER_MAX:
                self._sessions.pop(next(iter(self._sessions)))
        self._sessions[key] = now + REMEMBER_S
        self.events.emit(UserAuthentication(principal, address, True))

    def _refuse(self, request: web.Request, refusal: Refusal) -> web.HTTPUnauthorized:
        self.refused += 1
        peer = request.remote or ""
        parsed = parse_authorization(request.headers.get("Authorization", ""))
        if isinstance(parsed, tuple) and parsed[1]:  # a named user failed to log in
            user = f"user:{parsed[1][:64]}"  # PS3.15 A.5.3.13, outcome: failure
            self.events.emit(UserAuthentication(user, peer, False, refusal.reason))
        self.events.emit(
            SecurityAlert(
                kind="auth-failed",
                peer=peer,
                detail=f"web {request.method} {request.path[:200]}: {refusal.reason}",
            )
        )
        now = time.monotonic()
        if now - self._last_log.get(peer, 0.0) >= LOG_INTERVAL:  # a peer cannot flood the log
            if len(self._last_log) > 1024:
                self._last_log.clear()
            self._last_log[peer] = now
            log.warning("web request from %s refused: %s", peer, refusal.reason)
        # the body does not say which part was wrong (no user enumeration); the alert does
        refused = web.HTTPUnauthorized(
            text="401: a valid user and password, or bearer token, is required\n",
            content_type="text/plain",
        )
        for challenge in self.challenges():
            refused.headers.add("WWW-Authenticate", challenge)
        return refused
