"""``python -m medai users {list,add,set-role,disable,enable,reset-password,audit}`` and
``python -m medai tokens {create,list,revoke}`` (API tokens for the HTTP API).

Passwords are never taken as command-line arguments (they would land in shell history and ``ps``): they
are read with a hidden prompt, or from standard input with ``--password-stdin`` for scripts.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from medai import auth
from medai.errors import MedaiError
from medai.store import Store, local_time

ACTOR = "cli"


def add_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("users", help="manage dashboard users (admin)")
    usub = u.add_subparsers(dest="users_command", required=True)
    usub.add_parser("list", help="users, roles and last sign-in")
    a = usub.add_parser("add", help="create a user")
    a.add_argument("username")
    a.add_argument("--role", required=True, choices=auth.ROLES)
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    r = usub.add_parser("set-role", help="change a user's role")
    r.add_argument("username")
    r.add_argument("role", choices=auth.ROLES)
    for name in ("disable", "enable"):
        usub.add_parser(name, help=f"{name} a user's sign-in").add_argument("username")
    p = usub.add_parser("reset-password", help="set a new password (and clear a lockout)")
    p.add_argument("username")
    p.add_argument("--password-stdin", action="store_true")
    au = usub.add_parser("audit", help="recent audit log entries")
    au.add_argument("--limit", type=int, default=50)
    au.add_argument("--action", help="only this action, e.g. login_failed")


    t = sub.add_parser("tokens", help="API tokens for the HTTP API (admin)")
    tsub = t.add_subparsers(dest="tokens_command", required=True)
    tc = tsub.add_parser("create", help="make a token for a user; it is printed once and never again")
    tc.add_argument("username")
    tc.add_argument("--label", required=True, help="what the token is for, e.g. 'PACS bridge'")
    tl = tsub.add_parser("list", help="tokens (never the secret), newest first")
    tl.add_argument("--user")
    tsub.add_parser("revoke", help="revoke a token by id").add_argument("token_id", type=int)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("New password: ")
    if first != getpass.getpass("Repeat it: "):
        raise MedaiError("the two passwords differ")
    return first


def run(args: argparse.Namespace) -> int:
    store = Store()
    command = args.users_command
    if command == "list":
        print(f"{'username':<24}{'role':<14}{'state':<10}last sign-in")
        for user in store.list_users():
            state = "disabled" if user.disabled else "active"
            print(f"{user.username:<24}{user.role:<14}{state:<10}{local_time(user.last_login)}")
    elif command == "add":
        auth.create_user(store, args.username, _read_password(args.password_stdin), args.role, actor=ACTOR)
        print(f"created {args.username} ({args.role})")
    elif command == "set-role":
        auth.set_role(store, args.username, args.role, actor=ACTOR)
        print(f"{args.username} is now {args.role}")
    elif command in ("disable", "enable"):
        auth.set_disabled(store, args.username, command == "disable", actor=ACTOR)
        print(f"{args.username}: {command}d")
    elif command == "reset-password":
        auth.reset_password(store, args.username, _read_password(args.password_stdin), actor=ACTOR)
        print(f"new password set for {args.username}")
    elif command == "audit":
        for entry in store.audit_log(args.limit, args.action):
            print(f"{local_time(entry['ts'])}  {entry['username'] or '-':<20}{entry['action']:<16}{json.dumps(entry['detail'])}")
    return 0


def run_tokens(args: argparse.Namespace) -> int:
    store = Store()
    command = args.tokens_command
    if command == "create":
        token_id, token = auth.create_api_token(store, args.username, args.label, actor=ACTOR)
        print(f"token {token_id} for {args.username} ({args.label}); store it now, it is not shown again:",
              file=sys.stderr)
        print(token)
    elif command == "list":
        print(f"{'id':<6}{'user':<20}{'label':<28}{'prefix':<14}{'created':<18}{'last used':<18}state")
        for t in store.tokens(args.user):
            state = f"revoked {local_time(t['revoked_at'])}" if t["revoked_at"] else "active"
            print(f"{t['id']:<6}{t['username']:<20}{t['label'][:27]:<28}{t['prefix'] + '...':<14}"
                  f"{local_time(t['created_at']):<18}{local_time(t['last_used']):<18}{state}")
    elif command == "revoke":
        auth.revoke_api_token(store, args.token_id, actor=ACTOR)
        print(f"token {args.token_id} revoked")
    return 0
