"""Backbones: the engine's built-in architectures and users' uploaded weights for them."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Enum, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from backend.models.base import Base, UTCDateTime, utcnow

#: Longest backbone name (the column width; schemas and services import it).
BACKBONE_NAME_MAX_LENGTH = 100


class BackboneStatus(enum.StrEnum):
    """validating → ready | invalid (built-in entries are ready from the start)."""

    VALIDATING = "validating"
    READY = "ready"
    INVALID = "invalid"


class Backbone(Base):
    """An architecture from the engine's catalog, with uploaded weights or none (random init).

    Built-in entries have no owner and are visible to everyone; uploads belong to their owner.
    ``details`` records what validation found and did (parameter count, key prefixes stripped, a
    classifier head of another class count dropped, memory per megapixel); ``problems`` the first
    mismatches of an invalid file.
    """

    __tablename__ = "backbones"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True, default=None
    )
    name: Mapped[str] = mapped_column(String(BACKBONE_NAME_MAX_LENGTH))
    #: The engine's catalog name (``resnet18``, ``efficientnet_b0``...).
    architecture: Mapped[str] = mapped_column(String(64))
    #: The catalog name again on built-in rows, NULL on uploads: unique, so that built-in rows
    #: created lazily by concurrent first requests exist exactly once per architecture.
    builtin_key: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    status: Mapped[BackboneStatus] = mapped_column(
        Enum(
            BackboneStatus,
            name="backbone_status",
            native_enum=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        default=BackboneStatus.VALIDATING,
    )
    #: "builtin" or "upload".
    source: Mapped[str] = mapped_column(String(16), default="upload")
    original_filename: Mapped[str] = mapped_column(String(255), default="")
    #: Weights file relative to the data dir ("" for random init).
    weights_path: Mapped[str] = mapped_column(String(1024), default="")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    param_count: Mapped[int] = mapped_column(BigInteger, default=0)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    problems: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    validated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), default=None)
