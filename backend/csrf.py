"""CSRF protection for cookie-authenticated requests.

Signed-in browsers: each server-side session has its own random CSRF secret, which pages embed
(form field ``csrf_token`` and the ``X-CSRF-Token`` header HTMX sends from ``<body hx-headers>``).
The login form, which has no session yet, uses a signed double-submit cookie: a random cookie
value plus a form token that is its HMAC under the instance secret key.
"""

from __future__ import annotations

from fastapi import Request

from backend.config import Settings
from backend.security import constant_time_equal, random_token, sign

CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_CSRF_COOKIE = "tessera_login_csrf"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_LOGIN_PURPOSE = "login-csrf"
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


async def submitted_token(request: Request) -> str:
    """The CSRF token a request carries, from the header or else the form field ('' when absent)."""
    header = request.headers.get(CSRF_HEADER)
    if header:
        return header
    if request.headers.get("content-type", "").startswith(_FORM_TYPES):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        if isinstance(value, str):
            return value
    return ""


def matches(expected: str, submitted: str) -> bool:
    """True when ``submitted`` is exactly the expected token (compared in constant time)."""
    return bool(expected) and bool(submitted) and constant_time_equal(expected, submitted)


def login_cookie_value(request: Request) -> str:
    """The pre-session CSRF cookie the browser already holds, or a new random one."""
    return request.cookies.get(LOGIN_CSRF_COOKIE) or random_token(24)


def login_form_token(settings: Settings, cookie_value: str) -> str:
    """The form token that pairs with a pre-session cookie value."""
    return sign(settings, _LOGIN_PURPOSE, cookie_value)


def login_token_valid(settings: Settings, cookie_value: str | None, submitted: str) -> bool:
    """True when the login form's token was signed for the cookie the browser sent back."""
    if not cookie_value:
        return False
    return matches(login_form_token(settings, cookie_value), submitted)
