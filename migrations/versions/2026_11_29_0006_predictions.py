"""Predictions on uploaded images and evaluations on other datasets, of trained tasks.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 20:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TZ = sa.DateTime(timezone=True)


def _status(name: str) -> sa.Column:
    return sa.Column(
        "status",
        sa.Enum("queued", "running", "succeeded", "failed", name=name, native_enum=False, length=16),
        nullable=False,
    )


def _owner_and_task(table: str) -> list:
    return [
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f(f"fk_{table}_owner_id_users"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f(f"fk_{table}_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
    ]


def upgrade() -> None:
    """Create the predictions and evaluations tables."""
    op.create_table(
        "predictions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        _status("prediction_status"),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("dispatched_at", TZ, nullable=True),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        *_owner_and_task("predictions"),
    )
    for column in ("owner_id", "task_id", "status"):
        op.create_index(op.f(f"ix_predictions_{column}"), "predictions", [column])

    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("dataset_name", sa.String(length=100), nullable=False),
        _status("evaluation_status"),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("dispatched_at", TZ, nullable=True),
        sa.Column("started_at", TZ, nullable=True),
        sa.Column("finished_at", TZ, nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_evaluations_dataset_id_datasets"),
            ondelete="SET NULL",
        ),
        *_owner_and_task("evaluations"),
    )
    for column in ("owner_id", "task_id", "dataset_id", "status"):
        op.create_index(op.f(f"ix_evaluations_{column}"), "evaluations", [column])


def downgrade() -> None:
    """Drop both tables."""
    for column in ("owner_id", "task_id", "dataset_id", "status"):
        op.drop_index(op.f(f"ix_evaluations_{column}"), table_name="evaluations")
    op.drop_table("evaluations")
    for column in ("owner_id", "task_id", "status"):
        op.drop_index(op.f(f"ix_predictions_{column}"), table_name="predictions")
    op.drop_table("predictions")
