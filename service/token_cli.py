"""`topk token create|list|revoke`: the admin's commands for API tokens.

They write the server's database directly (the settings' TOPK_DATABASE_URL, or the SQLite file
under --data-dir / TOPK_DATA_DIR), so they need no running server and no token of their own.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

from jobs.contract import exit_codes
from service.console import fail, print_rows, redact, usage, utc

_DATA_DIR_HELP = "default: $TOPK_DATA_DIR or .topk"


def register(subparsers: argparse._SubParsersAction) -> None:
    token = subparsers.add_parser("token", help="admin: manage API tokens (writes the database)")
    token.set_defaults(handler=usage(token))
    commands = token.add_subparsers(dest="token_command", metavar="COMMAND")
    create = commands.add_parser(
        "create", help="create a token for NAME; the token is the last word printed"
    )
    create.add_argument("name", metavar="NAME")
    create.add_argument("--data-dir", help=_DATA_DIR_HELP)
    create.add_argument(
        "--create",
        action="store_true",
        help="make the database when it does not exist yet (`topk serve` makes it otherwise)",
    )
    create.set_defaults(handler=run_token_create)
    listing = commands.add_parser(
        "list", help="every token: its id, owner, created and revoked times (UTC), never a secret"
    )
    listing.add_argument("--data-dir", help=_DATA_DIR_HELP)
    listing.set_defaults(handler=run_token_list)
    revoke = commands.add_parser(
        "revoke",
        help="revoke every live token of an owner, or one token by its id (`topk token list`); "
        "the API refuses it within a second",
    )
    revoke.add_argument("target", metavar="NAME|ID", help="an owner name or a token id")
    which = revoke.add_mutually_exclusive_group()
    which.add_argument(
        "--owner", dest="target_kind", action="store_const", const="owner", help="NAME is an owner"
    )
    which.add_argument(
        "--id", dest="target_kind", action="store_const", const="id", help="ID is a token id"
    )
    revoke.add_argument("--data-dir", help=_DATA_DIR_HELP)
    revoke.set_defaults(handler=run_token_revoke)


def run_token_create(args) -> int:
    def create(store) -> int:
        try:
            token = store.create_token(args.name)
        except ValueError as exc:  # the owner's name
            return fail(str(exc), exit_codes.USAGE)
        print(f"created a token for {args.name} (store it now; it is not shown again): {token}")
        return exit_codes.OK

    return _on_database(args, create, "write the token to", create=args.create)


def run_token_list(args) -> int:
    def show(store) -> int:
        tokens = store.list_tokens()
        if not tokens:
            print("no tokens")
            return exit_codes.OK
        header = ("ID", "OWNER", "CREATED", "REVOKED")
        print_rows(header, [(t.id, t.owner, utc(t.created_at), utc(t.revoked_at)) for t in tokens])
        return exit_codes.OK

    return _on_database(args, show, "read the tokens in")


def run_token_revoke(args) -> int:
    return _on_database(
        args, lambda store: _revoke(store, args.target, args.target_kind), "revoke tokens in"
    )


class _NoDatabase(Exception):
    """The token commands found no service database where the settings point."""


def _on_database(
    args, command: Callable[..., int], doing: str, *, create: bool | None = None
) -> int:
    """`command(store)` on the server's database (the settings of the environment and
    --data-dir); its exit code, or the problem's: a bad setting or no database there is USAGE,
    a database that cannot be reached SERVICE (`doing` says what could not be done). `create`:
    `topk token create --create` (make the database); None for the commands that never do."""
    from pathlib import Path

    from service.settings import Settings

    try:
        settings = Settings.from_env(data_dir=args.data_dir and Path(args.data_dir))
    except ValueError as exc:
        return fail(str(exc), exit_codes.USAGE)
    store = None
    try:
        store = _token_store(settings, create=bool(create))
        return command(store)
    except _NoDatabase as exc:
        hint = "" if create is None else ", or pass --create to make a new one there"
        return fail(f"{exc}{hint}", exit_codes.USAGE)
    except Exception as exc:  # database unreachable
        return fail(f"cannot {doing} {redact(settings.database_url)}: {exc}", exit_codes.SERVICE)
    finally:
        if store is not None:
            store.close()


def _token_store(settings, *, create: bool = False):
    """The migrated Store of `settings`' database; says on stderr which database it is. A
    database that does not exist (no SQLite file, no schema in PostgreSQL) is _NoDatabase
    unless `create`: `topk token create` run from another directory used to make a new
    ./.topk/topk.db that no server reads. Raises when the database cannot be reached."""
    import sqlalchemy as sa

    from service.store import Store

    where = redact(settings.database_url)
    if settings.is_sqlite:
        path = sa.engine.make_url(settings.database_url).database or ""
        if not create and not os.path.isfile(path):
            raise _NoDatabase(
                f"no database at {path}: run this command with the server's --data-dir or "
                "TOPK_DATA_DIR (or TOPK_DATABASE_URL); `topk serve` makes the database"
            )
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store.from_url(settings.database_url)
    if not create and not sa.inspect(store.engine).has_table("schema_migrations"):
        store.close()
        raise _NoDatabase(
            f"{where} holds no topk tables: run this command with the server's "
            "TOPK_DATABASE_URL; `topk serve` makes the tables"
        )
    store.migrate()
    print(f"topk token: database {where}", file=sys.stderr)
    return store


def _revoke(store, target: str, kind: str | None) -> int:
    """Revoke `target`: an owner (all their live tokens) or a token id (or a longer prefix of
    the token's hash); `kind` ("owner" | "id" | None) says which when it could be both."""
    tokens = store.list_tokens()
    owned = [t for t in tokens if t.owner == target] if kind != "id" else []
    by_id = []
    if kind != "owner" and re.fullmatch(r"[0-9a-fA-F]{8,64}", target):
        by_id = [t for t in tokens if t.token_hash.startswith(target.lower())]
    if owned and by_id:
        return fail(
            f"{target!r} is both an owner and a token id: add --owner or --id", exit_codes.USAGE
        )
    if owned:
        live = [t.token_hash for t in owned if t.revoked_at is None]
        count = store.revoke_tokens(live)
        if count == 0:
            print(f"{target} has no live tokens (nothing to revoke)")
        else:
            print(f"revoked {count} token{'s' if count != 1 else ''} of {target}")
        return exit_codes.OK
    if len(by_id) > 1:
        return fail(
            f"{len(by_id)} tokens have ids starting {target!r}: give more of it", exit_codes.USAGE
        )
    if by_id:
        (token,) = by_id
        if store.revoke_tokens([token.token_hash]) == 0:
            when = f" at {utc(token.revoked_at)} UTC" if token.revoked_at is not None else ""
            print(f"token {token.id} of {token.owner} was already revoked{when}")
        else:
            print(f"revoked token {token.id} of {token.owner}")
        return exit_codes.OK
    what = {"owner": "no owner", "id": "no token id"}.get(kind or "", "no owner and no token id")
    return fail(f"{what} {target!r} (see `topk token list`)", exit_codes.USAGE)
