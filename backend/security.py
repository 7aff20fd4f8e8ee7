"""Small cryptographic helpers: password hashing, random secrets and signed values."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from functools import lru_cache

from pwdlib import PasswordHash
from pwdlib.hashers.argon2 import Argon2Hasher

from backend.config import Settings

# Verified against when the username is unknown, so both failures cost one argon2 check.
_DUMMY_PASSWORD = "tessera-dummy-password-for-timing"


@lru_cache
def _password_hash(time_cost: int, memory_cost: int) -> PasswordHash:
    return PasswordHash((Argon2Hasher(time_cost=time_cost, memory_cost=memory_cost),))


def password_hasher(settings: Settings) -> PasswordHash:
    """The argon2 hasher configured by ``settings`` (production uses argon2-cffi's recommended cost)."""
    return _password_hash(settings.argon2_time_cost, settings.argon2_memory_cost_kib)


def hash_password(settings: Settings, password: str) -> str:
    """Hash a password for storage."""
    return password_hasher(settings).hash(password)


def verify_password(settings: Settings, password: str, password_hash: str) -> bool:
    """Check a password against a stored hash (constant-time inside argon2)."""
    return password_hasher(settings).verify(password, password_hash)


@lru_cache
def _dummy_hash(time_cost: int, memory_cost: int) -> str:
    return _password_hash(time_cost, memory_cost).hash(_DUMMY_PASSWORD)


def burn_password_check(settings: Settings, password: str) -> None:
    """Spend the time of one real password check, for usernames that do not exist."""
    dummy = _dummy_hash(settings.argon2_time_cost, settings.argon2_memory_cost_kib)
    password_hasher(settings).verify(password, dummy)


def sha256_hex(value: str) -> str:
    """SHA-256 of a secret, as stored in the database instead of the secret itself."""
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def random_token(nbytes: int = 32) -> str:
    """A URL-safe random secret."""
    return secrets.token_urlsafe(nbytes)


def sign(settings: Settings, purpose: str, value: str) -> str:
    """HMAC of ``value`` under the instance secret key; ``purpose`` separates different uses."""
    key = settings.resolved_secret_key().encode("utf-8")
    return hmac.new(key, f"{purpose}:{value}".encode(), hashlib.sha256).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    """Compare two secrets without leaking where they differ."""
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))
