"""SQLAlchemy models, one module per table; importing this package registers them all."""

from backend.models.api_token import ApiToken, TokenKind
from backend.models.base import Base, utcnow
from backend.models.login_attempt import LoginAttempt
from backend.models.user import Role, User
from backend.models.user_session import UserSession

__all__ = ["ApiToken", "Base", "LoginAttempt", "Role", "TokenKind", "User", "UserSession", "utcnow"]
