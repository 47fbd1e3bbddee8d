"""Tokens minted by hand from a look-alike's state directory, for trying the gateway by hand:
``nhi-gateway lookalike token --state-dir DIR --user adele`` (an approver's token, as
``nhi-gateway approvals login`` gets it after an MFA sign-in) or ``--app mcp-directory`` (a
workload's Graph token, as the token endpoint issues it). The same keys and shapes the running
look-alike uses, so the gateway pointed at it accepts them."""

from __future__ import annotations

from pathlib import Path

from nhi_gateway.lookalike.directory import Directory
from nhi_gateway.lookalike.minting import EntraAuthority


class UnknownName(LookupError):
    pass


def find_user(directory: Directory, name: str) -> dict:
    """A user by UPN alias (``AdeleV``), given name (``adele``), UPN or object id, any case."""
    wanted = name.casefold()
    for user in directory.users:
        upn = user["userPrincipalName"].casefold()
        if wanted in (upn, upn.split("@")[0], str(user.get("givenName") or "").casefold(), user["id"]):
            return user
    names = ", ".join(sorted(str(u.get("givenName") or "").casefold() for u in directory.users))
    raise UnknownName(f"no user {name!r} in the look-alike tenant; known: {names}")


def _directory(state_dir: Path) -> Directory:
    from nhi_gateway.lookalike.server import INFO_FILE

    if not (state_dir / INFO_FILE).exists():
        raise UnknownName(f"{state_dir}: no look-alike has run here; start `nhi-gateway lookalike --state-dir "
                          f"{state_dir}` first (its keys sign the tokens)")
    return Directory(state_dir)


def approver_token(state_dir: Path, user_name: str, *, mfa: bool = True) -> str:
    directory = _directory(state_dir)
    user = find_user(directory, user_name)
    api = directory.approvals_api()
    return EntraAuthority.open(state_dir / "keys").mint_user_token(
        tenant_id=directory.tenant_id, object_id=user["id"], client_id=api["client_id"], audience=api["client_id"],
        scopes=[api["scope"]], version="2.0", name=user["displayName"], upn=user["userPrincipalName"],
        amr=["pwd", "mfa"] if mfa else ["pwd"], acrs=[api["auth_context"]] if mfa else [])


def app_token(state_dir: Path, app_name: str) -> str:
    directory = _directory(state_dir)
    apps = directory.client_summary()
    app = apps.get(app_name)
    if app is None:
        raise UnknownName(f"no application {app_name!r} in the look-alike tenant; known: {', '.join(sorted(apps))}")
    return EntraAuthority.open(state_dir / "keys").mint_app_token(
        tenant_id=directory.tenant_id, app_id=app["client_id"], object_id=app["object_id"],
        display_name=app["display_name"], roles=tuple(app.get("roles", ())))
