"""``nhi-gateway approvals``: what an approver does, through the running gateway's approval API.

    nhi-gateway approvals login [--tenant T] [--authority URL]   sign in (device code flow)
    nhi-gateway approvals logout
    nhi-gateway approvals list [--all]
    nhi-gateway approvals approve ID [--for DURATION] [--reason TEXT]
    nhi-gateway approvals deny ID [--reason TEXT]
    nhi-gateway approvals revoke GRANT_ID

The approval API accepts only the approver's own token for the gateway's app registration (a
Graph token is refused): ``approvals login`` gets one and keeps it in the OS keyring, or, without
one, prints ``export NHI_APPROVER_TOKEN=...`` (``eval "$(nhi-gateway approvals login)"``). The
token is read from ``--token`` (other users of the machine can see it in the process list),
``NHI_APPROVER_TOKEN``, or the keyring, in that order; ``az account get-access-token --scope
<App ID URI>/Approvals.Decide`` gets one too. The API address is ``--api``, ``NHI_APPROVALS_API``
or http://127.0.0.1:8081 (the gateway prints it at start).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime

import httpx

from nhi_gateway.approvals.store import parse_duration
from nhi_gateway.cli import approver_signin

ENV_TOKEN = "NHI_APPROVER_TOKEN"
ENV_API = "NHI_APPROVALS_API"
DEFAULT_API = "http://127.0.0.1:8081"
TIMEOUT = 30.0


class CommandFailed(Exception):
    pass


def _duration(value: str) -> str:
    try:
        parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def register(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=os.environ.get(ENV_API, DEFAULT_API), metavar="URL",
                        help=f"the gateway's approval API ({ENV_API}; default {DEFAULT_API})")
    common.add_argument("--token", default=None, metavar="TOKEN",
                        help=f"your own Entra access token (prefer the environment variable {ENV_TOKEN})")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    p = sub.add_parser("approvals", help="list, approve or deny held requests; list and revoke grants",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="approvals_command", required=True)
    a = actions.add_parser("login", parents=[common], help="sign in for the approval API (device code flow)")
    a.add_argument("--tenant", metavar="TENANT_ID", help="your tenant, when the gateway trusts several")
    a.add_argument("--client-id", metavar="GUID", help="the public client to sign in with (default: the policy's)")
    a.add_argument("--scope", metavar="SCOPE", help="the full scope (default: the policy's, e.g. api://.../Approvals.Decide)")
    a.add_argument("--authority", default=approver_signin.DEFAULT_AUTHORITY, metavar="URL",
                   help=f"the Entra sign-in host (default {approver_signin.DEFAULT_AUTHORITY}; a sovereign cloud's, "
                        "or the look-alike's)")
    a.add_argument("--no-keyring", action="store_true",
                   help="do not use the OS keyring: print the export line for this shell instead")
    actions.add_parser("logout", parents=[common], help="remove the token kept in the OS keyring")
    a = actions.add_parser("list", parents=[common], help="pending requests you may decide, and active grants")
    a.add_argument("--all", action="store_true", help="also decided requests and expired or revoked grants")
    a = actions.add_parser("approve", parents=[common], help="let a held request go on")
    a.add_argument("id", metavar="ID")
    a.add_argument("--for", dest="duration", type=_duration, metavar="DURATION",
                   help="also allow the same identity this operation for DURATION (e.g. 30m, 1h; at most "
                        "the rule's max_grant); without it, only the held request goes on")
    a.add_argument("--reason", default="", metavar="TEXT", help="why (kept in the audit trail)")
    a = actions.add_parser("deny", parents=[common], help="refuse a held request (403 naming you and the reason)")
    a.add_argument("id", metavar="ID")
    a.add_argument("--reason", default="", metavar="TEXT", help="why (the caller reads it)")
    a = actions.add_parser("revoke", parents=[common], help="end a grant before it expires")
    a.add_argument("id", metavar="GRANT_ID")
    p.set_defaults(handler=main)


def main(args) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call would bury the answer
    try:
        if args.approvals_command in SESSION:
            return SESSION[args.approvals_command](args)
        token = args.token or os.environ.get(ENV_TOKEN, "") or approver_signin.stored(args.api) or ""
        if not token.strip():
            raise CommandFailed(f"no approver token: run nhi-gateway approvals login (or set {ENV_TOKEN})")
        if approver_signin.expired(token.strip()):
            raise CommandFailed("your approver token has expired: run nhi-gateway approvals login again")
        with httpx.Client(base_url=args.api.rstrip("/"), timeout=TIMEOUT, trust_env=False,
                          headers={"Authorization": f"Bearer {token.strip()}"}) as client:
            return COMMANDS[args.approvals_command](client, args)
    except CommandFailed as e:
        print(f"nhi-gateway approvals: {e}", file=sys.stderr)
        return 1


def _call(client: httpx.Client, method: str, path: str, body: dict | None = None, **params) -> dict:
    try:
        response = client.request(method, path, json=body, params=params or None)
    except httpx.HTTPError as e:
        raise CommandFailed(f"cannot reach the approval API at {client.base_url}: {e}") from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code != 200:
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else response.text[:300]
        raise CommandFailed(f"{response.status_code}: {message}")
    if not isinstance(answer, dict):
        raise CommandFailed(f"the approval API answered something else than JSON: {response.text[:200]}")
    return answer


def _when(text: str | None) -> str:
    if not text:
        return "-"
    try:
        at = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return text
    left = int((at - datetime.now(UTC)).total_seconds())
    if left > 0:
        return f"{text} (in {left // 60}m{left % 60:02d}s)"
    return text


def _who(p: dict) -> str:
    return f"{p.get('display_name') or p.get('app_id') or '?'} ({p.get('object_id', '?')})"


def _by(a: dict | None) -> str:
    return f"{a.get('display_name') or a.get('object_id')}" if a else "-"


def cmd_list(client: httpx.Client, args) -> int:
    params = {"state": "all"} if args.all else {}
    approvals = _call(client, "GET", "/approvals", **params)
    grants = _call(client, "GET", "/grants", **params)
    if args.json:
        print(json.dumps({**approvals, **grants}, indent=2))
        return 0
    requests = approvals.get("approvals") or []
    print(f"{'Approval requests' if args.all else 'Pending approval requests'} ({len(requests)}):")
    for r in requests:
        print(f"  {r['id']}  {r['state']:<9}  {_who(r['principal'])}  {r['operation']}")
        details = [f"rule {r['rule']}", f"asked {r['created_at']}"]
        if r["state"] == "pending":
            details.append(f"expires {_when(r['expires_at'])}")
            details.append(f"--for up to {r['max_grant']}" if r.get("max_grant") else "this request only")
        else:
            details.append(f"{r['state']} by {_by(r.get('approver'))}: {r.get('reason') or '-'}")
        print(f"      {' · '.join(details)}")
        print(f"      {r['method']} {r['url']}  ({r['body_size']} bytes, {r['digest'][:19]}…)")
        if r.get("body_preview"):
            print(f"      body: {r['body_preview'][:300]}")
        if r.get("note"):
            print(f"      {r['note']}")
    grant_list = grants.get("grants") or []
    print(f"{'Grants' if args.all else 'Active grants'} ({len(grant_list)}):")
    for g in grant_list:
        print(f"  {g['id']}  {g['state']:<7}  {_who(g['principal'])}  {g['operation']}")
        print(f"      rule {g['rule']} · until {_when(g['expires_at'])} · approved by {_by(g['approver'])}"
              f": {g.get('reason') or '-'} (approval {g['approval_id']})")
    return 0


def cmd_approve(client: httpx.Client, args) -> int:
    body = {"reason": args.reason}
    if args.duration:
        body["for"] = args.duration
    answer = _call(client, "POST", f"/approvals/{args.id}/approve", body)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    r, g = answer["approval"], answer.get("grant")
    release = answer.get("release") or {}
    if release.get("refused"):
        # The policy in force was asked again at release, and a deny rule won over the approval.
        print(f"approved {r['id']}, but {_who(r['principal'])} {r['operation']} does not go on: the policy in "
              f"force refuses it ({release.get('reason')})")
    else:
        print(f"approved {r['id']}: {_who(r['principal'])} {r['operation']} goes on")
    if g:
        print(f"grant {g['id']}: the same operation is allowed until {g['expires_at']} "
              f"(revoke with: nhi-gateway approvals revoke {g['id']})")
    return 0


def cmd_deny(client: httpx.Client, args) -> int:
    answer = _call(client, "POST", f"/approvals/{args.id}/deny", {"reason": args.reason})
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    r = answer["approval"]
    print(f"denied {r['id']}: {_who(r['principal'])} gets 403 ({r.get('reason') or 'no reason given'})")
    return 0


def cmd_revoke(client: httpx.Client, args) -> int:
    answer = _call(client, "DELETE", f"/grants/{args.id}")
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    g = answer["grant"]
    print(f"revoked {g['id']}: {_who(g['principal'])} {g['operation']} needs approval again")
    return 0


def cmd_login(args) -> int:
    try:
        settings = approver_signin.SignInSettings.discover(args.api, tenant=args.tenant, client_id=args.client_id,
                                                           scope=args.scope)
        token = approver_signin.sign_in(settings, args.authority)
    except approver_signin.SignInFailed as e:
        raise CommandFailed(str(e)) from None
    who = approver_signin.describe(token)
    if not args.no_keyring and approver_signin.store(args.api, token):
        print(f"signed in as {who}; the token is kept in the OS keyring for nhi-gateway approvals", file=sys.stderr)
        return 0
    reason = "as asked (--no-keyring)" if args.no_keyring else "no OS keyring is available here"
    print(f"signed in as {who}; {reason}, so the token is not stored anywhere. Keep it in this shell's "
          f"memory with: eval \"$(nhi-gateway approvals login)\" (the export line follows)", file=sys.stderr)
    print(approver_signin.export_line(token), flush=True)
    return 0


def cmd_logout(args) -> int:
    removed = approver_signin.forget(args.api)
    print("the token was removed from the OS keyring" if removed else "no token was kept in the OS keyring",
          file=sys.stderr)
    if os.environ.get(ENV_TOKEN):
        print(f"{ENV_TOKEN} is still set in this shell: unset {ENV_TOKEN}", file=sys.stderr)
    return 0


SESSION = {"login": cmd_login, "logout": cmd_logout}

COMMANDS = {"list": cmd_list, "approve": cmd_approve, "deny": cmd_deny, "revoke": cmd_revoke}
