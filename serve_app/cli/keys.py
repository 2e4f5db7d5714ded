"""``troupe keys create|list|revoke`` (API keys, directly in the state store) and
``troupe webhooks verify`` (check a received batch webhook's signature).

The store is the one the gateway uses: ``--store URL``, else the state location of the
first Troupe app of ``--config`` (default ``config/local.yaml``, as ``troupe run``): its
``metrics.store_url``, or the app's own folder (``serve_app.store.location``). Gateways
pick up changes within ``auth.key_refresh_s``. The secret is printed once, at creation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from serve_app.cli.serve_config import read_serve_config
from serve_app.settings import ConfigError

__all__ = ["add_keys_parser", "store_url_for", "DEFAULT_CONFIG"]

#: The config ``troupe run`` serves by default, so ``troupe keys`` finds the same store.
DEFAULT_CONFIG = "config/local.yaml"


def store_url_for(args: argparse.Namespace) -> str:
    """``--store``, else the state store of ``--config``'s Troupe app.

    Raises:
        ConfigError: neither names a store (no ``--config`` and no ``config/local.yaml``).
    """
    if args.store:
        return args.store
    config = args.config or (DEFAULT_CONFIG if Path(DEFAULT_CONFIG).is_file() else None)
    if config is None:
        raise ConfigError(
            "name the store: --store URL, or --config SERVE_CONFIG of the app whose keys "
            "these are (each app keeps its own store unless its config names a shared one)"
        )
    return read_serve_config(Path(config)).state().store_url


async def _with_store(url: str, action: Any) -> Any:
    from serve_app.store import open_store

    store = open_store(url)
    await store.open()
    try:
        return await action(store)
    finally:
        await store.close()


def cmd_keys(args: argparse.Namespace) -> int:
    from serve_app.errors import TroupeError
    from serve_app.policies.keys import mint_key

    try:
        url = store_url_for(args)
    except ConfigError as exc:
        print(f"troupe: {exc}", file=sys.stderr)
        return 2
    if args.keys_command == "create":
        limits = {name: value for name, value in (
            ("requests_per_minute", args.rpm), ("requests_per_hour", args.rph),
            ("tokens_per_minute", args.tpm), ("concurrent_requests", args.concurrent),
        ) if value is not None}
        models = tuple(m for m in (args.models or "").split(",") if m)
        role = args.role or ("models" if models else "workspace")
        expires = time.time() + args.expires_in_days * 86400 if args.expires_in_days else None
        try:
            token, row = mint_key(args.name, role, models, limits, expires)
        except TroupeError as exc:
            print(f"troupe: {exc.message}", file=sys.stderr)
            return 2
        asyncio.run(_with_store(url, lambda s: s.key_create(row)))
        if args.json:
            print(json.dumps({**row.public(), "key": token}))
        else:
            print(f"created key {row.key_id} ({role}{': ' + ','.join(models) if models else ''})")
            print(f"\n    {token}\n")
            print("This secret is shown only now; store it safely. Use it as "
                  "'Authorization: Bearer <key>'.")
        return 0
    if args.keys_command == "list":
        rows = asyncio.run(_with_store(url, lambda s: s.key_list()))
        if args.json:
            print(json.dumps([r.public() for r in rows], indent=2))
            return 0
        for r in rows:
            state = "revoked" if r.revoked_at else (
                "expired" if r.expires_at and r.expires_at < time.time() else "active")
            scope = ",".join(r.models) if r.models else ""
            print(f"{r.key_id}  {state:8} {r.role:9} {scope:20} {r.name}")
        return 0
    revoked = asyncio.run(_with_store(url, lambda s: s.key_revoke(args.key_id, time.time())))
    if not revoked:
        print(f"troupe: no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked key {args.key_id} (gateways refuse it within auth.key_refresh_s)")
    return 0


def cmd_webhook_verify(args: argparse.Namespace) -> int:
    """Check a received webhook: exit 0 when the signature is valid and fresh."""
    import os

    from serve_app.gateway.webhooks import verify_signature

    secret = os.environ.get(args.secret_env, "")
    if not secret:
        print(f"troupe: ${args.secret_env} is empty", file=sys.stderr)
        return 2
    body = Path(args.body_file).read_bytes() if args.body_file != "-" else sys.stdin.buffer.read()
    ok = verify_signature(secret, body, args.signature, tolerance_s=args.tolerance)
    print("valid" if ok else "INVALID (tampered body, wrong secret or stale timestamp)")
    return 0 if ok else 1


def add_keys_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    keys.add_argument("--store", help="state store URL (sqlite:///… or postgresql://…)")
    keys.add_argument("--config", help="Serve config of the app whose store to use "
                      f"(default: {DEFAULT_CONFIG})")
    keys.add_argument("--json", action="store_true", help="print JSON")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key (the secret is shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=["workspace", "models", "admin"])
    create.add_argument("--models", help="comma-separated model ids (role 'models')")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--rph", type=int, help="requests per hour")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--concurrent", type=int, help="concurrent requests")
    create.add_argument("--expires-in-days", type=float)
    ksub.add_parser("list", help="list keys (never their secrets)")
    revoke = ksub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id")
    keys.set_defaults(func=cmd_keys)
    hooks = sub.add_parser("webhooks", help="verify a received batch webhook")
    hsub = hooks.add_subparsers(dest="webhooks_command", required=True)
    verify = hsub.add_parser("verify", help="check a Troupe-Signature against a body")
    verify.add_argument("--signature", required=True, help="the Troupe-Signature header value")
    verify.add_argument("--body-file", default="-", help="the raw body (default: stdin)")
    verify.add_argument("--secret-env", default="TROUPE_WEBHOOK_SECRET")
    verify.add_argument("--tolerance", type=float, default=300.0, help="seconds")
    verify.set_defaults(func=cmd_webhook_verify)


