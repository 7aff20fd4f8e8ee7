"""SQLAlchemy models, one module per table; importing this package registers them all."""

from backend.models.api_token import TOKEN_NAME_MAX_LENGTH, ApiToken, TokenKind
from backend.models.backbone import BACKBONE_NAME_MAX_LENGTH, Backbone, BackboneStatus
from backend.models.base import Base, utcnow
from backend.models.dataset import DATASET_NAME_MAX_LENGTH, Dataset, DatasetStatus
from backend.models.login_attempt import LoginAttempt
from backend.models.prediction import PREDICTION_FILENAME_MAX_LENGTH, Evaluation, JobStatus, Prediction
from backend.models.task import (
    TASK_EVENTS_KEPT,
    TASK_NAME_MAX_LENGTH,
    TERMINAL_STATUSES,
    Task,
    TaskEvent,
    TaskMetric,
    TaskStatus,
)
from backend.models.user import USERNAME_MAX_LENGTH, Role, User
from backend.models.user_session import SESSION_ID_LENGTH, UserSession
from backend.models.worker import Worker

__all__ = [
    "BACKBONE_NAME_MAX_LENGTH",
    "DATASET_NAME_MAX_LENGTH",
    "PREDICTION_FILENAME_MAX_LENGTH",
    "SESSION_ID_LENGTH",
    "TASK_EVENTS_KEPT",
    "TASK_NAME_MAX_LENGTH",
    "TERMINAL_STATUSES",
    "TOKEN_NAME_MAX_LENGTH",
    "USERNAME_MAX_LENGTH",
    "ApiToken",
    "Backbone",
    "BackboneStatus",
    "Dataset",
    "DatasetStatus",
    "Evaluation",
    "JobStatus",
    "Base",
    "LoginAttempt",
    "Prediction",
    "Role",
    "Task",
    "TaskEvent",
    "TaskMetric",
    "TaskStatus",
    "TokenKind",
    "User",
    "UserSession",
    "Worker",
    "utcnow",
]
