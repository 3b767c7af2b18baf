"""Accounts, login sessions and CSRF tokens of the console.

Passwords are hashed with Argon2id (argon2-cffi, the winner of the Password Hashing
Competition, with its recommended parameters); a hash made with older parameters is
replaced at the next login. A login session is a random token in a ``__Host-`` cookie
(Secure, HttpOnly, SameSite=Strict); the database keeps only its SHA-256, its expiry and
the session's CSRF token, so a logout or an admin's change takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import Connection, Engine, delete, insert, select, update

from devicebridge.clinic import schema as t
from devicebridge.clinic.errors import AccountError

SESSION_LIFETIME: Final = timedelta(hours=12)
TOKEN_BYTES: Final = 32
MIN_PASSWORD_CHARS: Final = 10
USERNAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASHER: Final = PasswordHasher()
# Verified against when the user does not exist, so both cases take the same time.
_DUMMY_HASH: Final = _HASHER.hash(secrets.token_hex(16))


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str
    therapist_id: str | None
    is_admin: bool


@dataclass(frozen=True, slots=True)
class LoginSession:
    token: str  # goes into the cookie, never stored
    user: User
    csrf_token: str
    expires_at: datetime


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    return _HASHER.hash(password)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _user(row: Any) -> User:
    return User(int(row.id), str(row.username), row.therapist_id, bool(row.is_admin))


class Accounts:
    """Users, passwords and login sessions in the console's database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def count(self) -> int:
        with self.engine.connect() as db:
            return len(db.execute(select(t.users.c.id).limit(1)).all())

    def create(
        self,
        username: str,
        password: str,
        *,
        therapist_id: str | None = None,
        is_admin: bool = False,
    ) -> User:
        if not USERNAME_PATTERN.match(username):
            raise AccountError(
                f"user name {username!r}: letters, digits, '.', '_' and '-', at most 64"
            )
        if therapist_id is not None and not USERNAME_PATTERN.match(therapist_id):
            raise AccountError(f"therapist id {therapist_id!r} cannot name a key file")
        password_hash = hash_password(password)
        with self.engine.begin() as db:
            if db.execute(select(t.users.c.id).where(t.users.c.username == username)).first():
                raise AccountError(f"user {username!r} exists already")
            user_id = db.execute(
                insert(t.users)
                .values(
                    username=username,
                    password_hash=password_hash,
                    therapist_id=therapist_id,
                    is_admin=is_admin,
                    disabled=False,
                    created_at=datetime.now(UTC),
                )
                .returning(t.users.c.id)
            ).scalar_one()
        return User(int(user_id), username, therapist_id, is_admin)

    def set_password(self, username: str, password: str) -> None:
        password_hash = hash_password(password)
        with self.engine.begin() as db:
            result = db.execute(
                update(t.users)
                .where(t.users.c.username == username)
                .values(password_hash=password_hash)
            )
            if not result.rowcount:
                raise AccountError(f"no user {username!r}")
            self._end_sessions(db, username)

    def set_disabled(self, username: str, disabled: bool) -> None:
        with self.engine.begin() as db:
            result = db.execute(
                update(t.users).where(t.users.c.username == username).values(disabled=disabled)
            )
            if not result.rowcount:
                raise AccountError(f"no user {username!r}")
            if disabled:
                self._end_sessions(db, username)

    def _end_sessions(self, db: Connection, username: str) -> None:
        user_ids = select(t.users.c.id).where(t.users.c.username == username)
        db.execute(delete(t.web_sessions).where(t.web_sessions.c.user_id.in_(user_ids)))

    def users(self) -> list[User]:
        with self.engine.connect() as db:
            rows = db.execute(
                select(t.users).where(t.users.c.disabled.is_(False)).order_by(t.users.c.username)
            ).all()
        return [_user(r) for r in rows]

    def authenticate(self, username: str, password: str) -> User | None:
        """The user if the password is right (and the account enabled), else None."""
        with self.engine.connect() as db:
            row = db.execute(select(t.users).where(t.users.c.username == username)).first()
        try:
            _HASHER.verify(row.password_hash if row else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if row is None or row.disabled:
            return None
        if _HASHER.check_needs_rehash(row.password_hash):
            with self.engine.begin() as db:
                db.execute(
                    update(t.users)
                    .where(t.users.c.id == row.id)
                    .values(password_hash=_HASHER.hash(password))
                )
        return _user(row)

    def open_session(self, user: User) -> LoginSession:
        token = secrets.token_urlsafe(TOKEN_BYTES)
        csrf = secrets.token_urlsafe(TOKEN_BYTES)
        now = datetime.now(UTC)
        with self.engine.begin() as db:
            db.execute(delete(t.web_sessions).where(t.web_sessions.c.expires_at < now))
            db.execute(
                insert(t.web_sessions).values(
                    token_hash=_token_hash(token),
                    user_id=user.id,
                    csrf_token=csrf,
                    created_at=now,
                    expires_at=now + SESSION_LIFETIME,
                )
            )
        return LoginSession(token, user, csrf, now + SESSION_LIFETIME)

    def session(self, token: str) -> LoginSession | None:
        if not token or len(token) > 200:
            return None
        with self.engine.connect() as db:
            row = db.execute(
                select(t.web_sessions, t.users)
                .join(t.users, t.users.c.id == t.web_sessions.c.user_id)
                .where(t.web_sessions.c.token_hash == _token_hash(token))
            ).first()
        if row is None or row.disabled:
            return None
        expires = row.expires_at
        if expires.tzinfo is None:  # SQLite hands back naive times
            expires = expires.replace(tzinfo=UTC)
        if expires <= datetime.now(UTC):
            return None
        user = User(int(row.user_id), row.username, row.therapist_id, bool(row.is_admin))
        return LoginSession(token, user, row.csrf_token, expires)

    def close_session(self, token: str) -> None:
        with self.engine.begin() as db:
            db.execute(
                delete(t.web_sessions).where(t.web_sessions.c.token_hash == _token_hash(token))
            )


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token."""
    return bool(given) and hmac.compare_digest(expected.encode(), str(given).encode())
