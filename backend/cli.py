"""The ``tessera`` command: serve, worker, migrate and user administration."""

from __future__ import annotations

import os
import sys

import typer

from backend.accounts import users as user_service
from backend.config import get_settings
from backend.db import downgrade_database, session_scope, upgrade_database
from backend.errors import AppError
from backend.models import Role

app = typer.Typer(
    help="Tessera: train vision models on very large images with PatchGD.", no_args_is_help=True
)
user_app = typer.Typer(help="Manage accounts.", no_args_is_help=True)
app.add_typer(user_app, name="user")


def _fail(message: str) -> None:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.command()
def serve() -> None:
    """Migrate the database, create the first admin if needed, and run the API with its workers."""
    # Imported here: the supervisor pulls in process management only this command needs.
    from backend.supervisor import serve as run_supervisor

    raise typer.Exit(code=run_supervisor(get_settings()))


@app.command()
def worker(
    concurrency: int | None = typer.Option(
        None, "--concurrency", "-c", min=1, help="Worker processes (default: settings)."
    ),
) -> None:
    """Run a Celery worker in the foreground (replaces this process)."""
    from backend.supervisor import worker_command

    settings = get_settings()
    if concurrency is not None:
        settings = settings.model_copy(update={"worker_concurrency": concurrency})
    # The same command line `serve` starts, so pool, hostname and log level never drift apart.
    argv = worker_command(settings)
    os.execv(sys.executable, argv)


@app.command()
def migrate(
    revision: str = typer.Option("head", "--revision", help="Upgrade to this revision."),
    down: str = typer.Option(None, "--down", help="Downgrade to this revision instead (for example 'base')."),
) -> None:
    """Apply (or revert) database migrations."""

    settings = get_settings()
    if down:
        downgrade_database(settings, down)
        typer.echo(f"Database downgraded to {down}.")
    else:
        upgrade_database(settings, revision)
        typer.echo(f"Database upgraded to {revision}.")


@app.command("demo-data")
def demo_data(
    user: str = typer.Option(None, "--user", help="Owner of the dataset (default: the first admin)."),
    canvas_size: int = typer.Option(512, "--canvas-size", min=64, help="Side of each square canvas, in px."),
    count: int = typer.Option(
        600, "--count", min=12, help="Images in all (train 2/3, val and test 1/6 each)."
    ),
    seed: int = typer.Option(0, "--seed", help="Same seed, same images."),
    name: str = typer.Option(None, "--name", help="Dataset name (default: describes the options)."),
) -> None:
    """Register an UltraMNIST-style demo dataset; a worker builds and validates it."""
    # The generator needs numpy and PIL: the `datasets.demo` job runs it in a worker, never here.
    from backend.datasets import service as dataset_service

    settings = get_settings()
    try:
        with session_scope(settings) as session:
            owner = (
                user_service.get_by_username(session, user) if user else dataset_service.first_admin(session)
            )
            if owner is None:
                _fail(
                    f"No account named '{user}'."
                    if user
                    else "No admin account yet: run `tessera serve` first."
                )
            dataset = dataset_service.register_demo(
                session, settings, owner, canvas_size=canvas_size, count=count, seed=seed, name=name
            )
            dataset_id, owner_name = dataset.id, owner.username
    except AppError as exc:
        _fail(exc.detail)
    typer.echo(
        f"Registered demo dataset {dataset_id} for '{owner_name}'; a worker builds and validates it "
        "(`tessera serve` or `tessera worker`)."
    )


def _read_new_password(password_stdin: bool) -> str:
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            _fail("No password on standard input.")
        return password
    if not sys.stdin.isatty():
        _fail("Standard input is not a terminal: pass --password-stdin and pipe the password in.")
    return typer.prompt("Password", hide_input=True, confirmation_prompt=True)


@user_app.command("create")
def user_create(
    username: str = typer.Argument(..., help="Login name (letters, digits, '.', '_', '-')."),
    admin: bool = typer.Option(False, "--admin", help="Make the account an administrator."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input."
    ),
) -> None:
    """Create an account (prompts for the password twice when interactive)."""

    settings = get_settings()
    password = _read_new_password(password_stdin)
    role = Role.ADMIN if admin else Role.MEMBER
    try:
        with session_scope(settings) as session:
            user = user_service.create_user(session, settings, username, password, role)
            name = user.username
    except AppError as exc:
        _fail(exc.detail)
    typer.echo(f"Created {role.value} '{name}'.")


@user_app.command("list")
def user_list() -> None:
    """List every account."""

    with session_scope(get_settings()) as session:
        users = user_service.list_users(session)
        rows = [
            (u.username, u.role.value, "active" if u.is_active else "deactivated", u.created_at)
            for u in users
        ]
    if not rows:
        typer.echo("No accounts yet.")
        return
    width = max(len(row[0]) for row in rows)
    for name, role, state, created in rows:
        typer.echo(f"{name:<{width}}  {role:<6}  {state:<11}  {created:%Y-%m-%d %H:%M} UTC")


@user_app.command("deactivate")
def user_deactivate(username: str = typer.Argument(..., help="Account to deactivate.")) -> None:
    """Deactivate an account and revoke all its sessions and API tokens."""

    with session_scope(get_settings()) as session:
        user = user_service.get_by_username(session, username)
        if user is None:
            _fail(f"No account named '{username}'.")
        user_service.deactivate_user(session, user)
    typer.echo(
        f"Deactivated '{user_service.normalize_username(username)}'; its sessions and tokens are revoked."
    )


@user_app.command("set-password")
def user_set_password(
    username: str = typer.Argument(..., help="Account whose password to replace."),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from standard input."
    ),
) -> None:
    """Replace an account's password (signs it out of every browser)."""

    settings = get_settings()
    password = _read_new_password(password_stdin)
    try:
        with session_scope(settings) as session:
            user = user_service.get_by_username(session, username)
            if user is None:
                _fail(f"No account named '{username}'.")
            user_service.set_password(session, settings, user, password)
    except AppError as exc:
        _fail(exc.detail)
    typer.echo(f"Password of '{user_service.normalize_username(username)}' changed.")
