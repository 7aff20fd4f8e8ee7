"""Account housekeeping: pruning old login attempts and dead sessions and tokens (Celery beat)."""

from __future__ import annotations

import logging
from dataclasses import asdict

from backend.accounts.retention import prune_account_records
from backend.config import get_settings
from backend.db import session_scope
from backend.queue import ACCOUNTS_PRUNE
from worker.celery_app import celery_app

logger = logging.getLogger(__name__)


@celery_app.task(name=ACCOUNTS_PRUNE)
def prune() -> dict[str, int]:
    """Delete account records past their retention (``account_records_retention_days``)."""
    settings = get_settings()
    with session_scope(settings) as session:
        pruned = prune_account_records(session, settings)
    counts = asdict(pruned)
    logger.info("pruned account records: %s", counts)
    return counts
