"""The sidecar's own browser session: an encrypted cookie (aiohttp-session) with key rotation.

The cookie holds who the session belongs to, a hash binding it to the console credential it
was created under (a different console login never inherits a verification), when MFA was
last verified and under which MFA generation (a reset ends verified sessions), a CSRF token
and a random session id (WebAuthn challenges are bound to it). It is HttpOnly, SameSite=Lax
and Secure unless explicitly disabled for plain-http localhost; its Fernet TTL and max-age
are ``mfa.verify_every``. Keys: the first of ``mfa.session.secret_keys`` encrypts, all of
them decrypt, so a key can be rotated in without logging everybody out.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp_session import AbstractStorage, Session, get_session, new_session
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

log = logging.getLogger("sidecar.session")

_USER = "uid"
_BINDING = "cred"
_VERIFIED_AT = "vat"
_GENERATION = "gen"
_CSRF = "csrf"
_SID = "sid"
_GRACE_SHOWN = "gshown"


class RotatingCookieStorage(AbstractStorage):
    """``EncryptedCookieStorage`` with a list of keys (aiohttp-session has no rotation)."""

    def __init__(self, keys: list[str], *, cookie_name: str, max_age: int, secure: bool) -> None:
        super().__init__(
            cookie_name=cookie_name,
            max_age=max_age,
            path="/",
            secure=secure,
            httponly=True,
            samesite="Lax",
        )
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])

    async def load_session(self, request: web.Request) -> Session:
        cookie = self.load_cookie(request)
        if cookie is None:
            return Session(None, data=None, new=True, max_age=self.max_age)
        try:
            data = json.loads(self._fernet.decrypt(cookie.encode(), ttl=self.max_age))
        except (InvalidToken, ValueError, UnicodeError):
            # Expired, tampered with, or encrypted under a retired key: start afresh.
            return Session(None, data=None, new=True, max_age=self.max_age)
        if not isinstance(data, dict) or not isinstance(data.get("session"), dict):
            return Session(None, data=None, new=True, max_age=self.max_age)
        return Session(None, data=cast(Any, data), new=False, max_age=self.max_age)

    async def save_session(
        self, request: web.Request, response: web.StreamResponse, session: Session
    ) -> None:
        if session.empty:
            self.save_cookie(response, "", max_age=session.max_age)
            return
        payload = json.dumps(self._get_session_data(session), separators=(",", ":"))
        self.save_cookie(
            response, self._fernet.encrypt(payload.encode()).decode(), max_age=session.max_age
        )


@dataclass(frozen=True, slots=True)
class SessionView:
    """What the MFA gate reads from a session (a snapshot; cheap to build)."""

    user: str | None
    binding: str | None
    verified_at: float | None
    generation: int | None
    grace_shown: bool

    def verified_for(
        self, *, user: str, binding: str, generation: int, now: float, verify_every: float
    ) -> bool:
        return (
            self.user == user
            and self.binding == binding
            and self.generation == generation
            and self.verified_at is not None
            and now - self.verified_at < verify_every
        )


def view(session: Session) -> SessionView:
    verified_at = session.get(_VERIFIED_AT)
    generation = session.get(_GENERATION)
    return SessionView(
        user=session.get(_USER),
        binding=session.get(_BINDING),
        verified_at=float(verified_at) if isinstance(verified_at, int | float) else None,
        generation=generation if isinstance(generation, int) else None,
        grace_shown=bool(session.get(_GRACE_SHOWN)),
    )


async def session_for(request: web.Request, *, user: str, binding: str) -> Session:
    """The request's session, reset when it belongs to another user or console login."""
    session = await get_session(request)
    if session.get(_USER) != user or session.get(_BINDING) != binding:
        session.clear()
        session[_USER] = user
        session[_BINDING] = binding
        session[_CSRF] = secrets.token_urlsafe(32)
        session[_SID] = secrets.token_urlsafe(16)
    return session


async def mark_verified(
    request: web.Request, *, user: str, binding: str, generation: int
) -> Session:
    """Start a *new* session (a fresh cookie, no fixation) recording the verification."""
    session = await new_session(request)
    session[_USER] = user
    session[_BINDING] = binding
    session[_CSRF] = secrets.token_urlsafe(32)
    session[_SID] = secrets.token_urlsafe(16)
    session[_VERIFIED_AT] = time.time()
    session[_GENERATION] = generation
    return session


def csrf_token(session: Session) -> str:
    token = session.get(_CSRF)
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        session[_CSRF] = token
    return token


def session_id(session: Session) -> str:
    sid = session.get(_SID)
    if not isinstance(sid, str):
        sid = secrets.token_urlsafe(16)
        session[_SID] = sid
    return sid


def mark_grace_shown(session: Session) -> None:
    session[_GRACE_SHOWN] = True


def verified_recently(session: Session, *, now: float, within: float) -> bool:
    verified_at = session.get(_VERIFIED_AT)
    return isinstance(verified_at, int | float) and now - verified_at < within


def remember_challenge(session: Session, purpose: str, challenge_id: str) -> None:
    """Keep the id of the WebAuthn challenge in progress (one per purpose)."""
    session[f"wa:{purpose}"] = challenge_id


def pop_challenge(session: Session, purpose: str) -> object:
    return session.pop(f"wa:{purpose}", None)
