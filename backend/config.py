"""Settings: the only place in Tessera that reads the environment.

Every option can be set as ``TESSERA_<NAME>`` (for example ``TESSERA_DATA_DIR``). The two
connection strings also accept the conventional plain names ``DATABASE_URL`` and ``BROKER_URL``.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SECRET_KEY_FILE = "secret_key"


class Settings(BaseSettings):
    """Runtime configuration, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="TESSERA_", env_file=None, extra="ignore")

    # Storage and connections
    data_dir: Path = Field(
        default=Path("data"), description="Folder for the SQLite files, uploads and artifacts."
    )
    database_url: str = Field(
        default="",
        validation_alias=AliasChoices("TESSERA_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL; empty means a SQLite file in the data dir.",
    )
    broker_url: str = Field(
        default="",
        validation_alias=AliasChoices("TESSERA_BROKER_URL", "BROKER_URL"),
        description="Celery broker URL; empty means kombu's SQLite transport in the data dir.",
    )
    secret_key: str = Field(
        default="",
        description="Signs CSRF tokens. Empty: generated once and kept in <data_dir>/secret_key.",
    )

    # Serving
    host: str = "127.0.0.1"
    port: int = 8000
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        description="Training runs `serve`'s training worker (and `tessera worker`) runs at once.",
    )
    light_worker_concurrency: int = Field(
        default=2,
        ge=1,
        description="Processes of `serve`'s light worker (plans, validations, measurements, the reaper).",
    )
    web_concurrency: int = Field(
        default=32,
        ge=1,
        description="Requests the web process works on at once (its database pool has as many "
        "connections, plus a few spare); more wait in line.",
    )
    web_gc_freeze: bool = Field(
        default=True,
        description="Move the objects alive once the web process has started out of the cyclic "
        "garbage collector's reach (gc.freeze), so its full collections do not stall requests.",
    )
    log_level: str = "INFO"
    log_json: bool = Field(default=False, description="Log one JSON object per line instead of text.")

    # Accounts and sessions
    session_cookie_name: str = "tessera_session"
    session_max_age_seconds: int = Field(default=14 * 24 * 3600, ge=60)
    cookie_secure: bool = Field(default=False, description="Set the Secure flag (enable behind HTTPS).")
    access_token_max_age_seconds: int = Field(default=3600, ge=60, description="OAuth2 password-flow tokens.")
    login_max_failures: int = Field(
        default=10,
        ge=1,
        description="Failed logins per account and window before the clients that failed are refused.",
    )
    login_ip_max_failures: int = Field(
        default=50, ge=1, description="Failed logins per client IP and window, across all accounts."
    )
    login_window_seconds: int = Field(default=15 * 60, ge=1)
    account_records_retention_days: int = Field(
        default=30,
        ge=0,
        description="Days login attempts, and expired or revoked sessions and tokens, are kept.",
    )
    account_prune_interval_seconds: int = Field(
        default=3600, ge=1, description="How often Celery beat runs the pruning of those records."
    )
    admin_username: str = Field(
        default="admin", description="First admin created by `serve` when no user exists."
    )
    admin_password: str = Field(
        default="", description="Password of that first admin; empty: generated and printed."
    )
    argon2_time_cost: int = Field(default=3, ge=1, description="Argon2 iterations for password hashes.")
    argon2_memory_cost_kib: int = Field(default=65536, ge=8, description="Argon2 memory per hash, in KiB.")
    session_touch_interval_seconds: int = Field(
        default=60, ge=0, description="How often a session's last-seen time is written (fewer writes)."
    )
    health_broker_timeout_seconds: float = Field(default=2.0, gt=0, description="Broker timeout in /healthz.")
    metrics_token: str = Field(
        default="",
        description="When set, /metrics requires `Authorization: Bearer <it>`; empty: /metrics is open.",
    )
    broker_timeout_seconds: float = Field(
        default=3.0, gt=0, description="Connect and socket timeout of every enqueue from the web process."
    )

    # Limits on what users send (uploads and the engine's readers)
    max_request_body_bytes: int = Field(
        default=2 * 1024**2,
        ge=1,
        description="Largest JSON or form request body; streamed uploads have their own limits.",
    )
    max_upload_bytes: int = Field(
        default=20 * 1024**3, ge=1, description="Largest dataset upload (the archive as sent), in bytes."
    )
    dataset_quota_bytes: int = Field(
        default=100 * 1024**3,
        ge=1,
        description="Per-user storage quota: the uploads of all of a user's datasets together, in bytes.",
    )
    stale_upload_hours: float = Field(
        default=24.0,
        gt=0,
        description="An upload that received no bytes for this long is removed (row, file, quota).",
    )
    demo_dataset_on_serve: bool = Field(
        default=True,
        description="`serve` registers a small UltraMNIST-style demo dataset when no dataset exists yet.",
    )
    import_root: str = Field(
        default="",
        description="Folder on the server that administrators may import datasets from (hard links, "
        "no copy, on the same filesystem); empty: imports are disabled.",
    )
    max_weights_upload_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="Largest backbone weights file accepted for upload."
    )
    max_prediction_upload_bytes: int = Field(
        default=8 * 1024**3,
        ge=1,
        description="Largest image (a slide included) accepted for a prediction, in bytes.",
    )
    prediction_timeout_seconds: float = Field(
        default=6 * 3600.0,
        gt=0,
        description="A prediction or evaluation still running this long after it started is failed "
        "(its worker died); one left queued is sent again like a task.",
    )
    max_archive_members: int = Field(default=200_000, ge=1)
    max_extracted_bytes: int = Field(default=200 * 1024**3, ge=1)
    max_compression_ratio: float = Field(default=200.0, gt=1)
    max_image_pixels: int = Field(
        default=1_000_000_000, ge=1, description="Decompression-bomb guard for images."
    )
    # Training tasks.
    max_running_tasks_per_user: int = Field(
        default=2, ge=1, description="Tasks of one user that run at once; the others wait, queued."
    )
    task_max_attempts: int = Field(
        default=3, ge=1, description="Starts of a task (a lost worker counts one) before it is failed."
    )
    task_lease_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A running task whose worker sent no heartbeat for this long is requeued by the reaper.",
    )
    task_reaper_interval_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often Celery beat looks for expired leases and stale queued tasks.",
    )
    task_redispatch_after_seconds: float = Field(
        default=120.0,
        gt=0,
        description="A task still queued this long after its message was sent is sent again.",
    )
    task_checkpoint_every_minutes: float = Field(
        default=5.0, gt=0, description="Default of a task's mid-epoch checkpoint interval."
    )
    task_progress_interval_seconds: float = Field(
        default=1.5, gt=0, description="Progress is written, and cancellation read, at most this often."
    )

    # Workers page.
    worker_heartbeat_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often each worker process writes its row (last seen, what it runs).",
    )
    worker_offline_after_beats: int = Field(
        default=3, ge=2, description="A worker process silent for this many beats is shown offline."
    )
    worker_prune_after_seconds: float = Field(
        default=3600.0, gt=0, description="An offline worker's row is deleted after this long."
    )

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'tessera.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.db'}"
        return self

    @property
    def is_sqlite(self) -> bool:
        """True when the database is the embedded SQLite file."""
        return self.database_url.startswith("sqlite")

    def ensure_data_dir(self) -> Path:
        """Create the data folder (and its parents) if needed and return it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir

    def resolved_secret_key(self) -> str:
        """The configured secret key, or one generated on first use and kept in the data dir (0600)."""
        if self.secret_key:
            return self.secret_key
        path = self.ensure_data_dir() / SECRET_KEY_FILE
        if not path.exists():
            key = secrets.token_urlsafe(48)
            try:
                with open(path, "x", encoding="ascii") as handle:
                    handle.write(key)
                path.chmod(0o600)
            except FileExistsError:
                pass  # another process won the race; read theirs
        self.secret_key = path.read_text(encoding="ascii").strip()
        return self.secret_key


@lru_cache
def get_settings() -> Settings:
    """Process-wide settings (tests override the FastAPI dependency or clear this cache)."""
    return Settings()
