"""``nhi-gateway permissions`` and the lookup in Microsoft's Graph permissions reference behind it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nhi_gateway.cli.main import main
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource
from nhi_gateway.policy.permissions import DATA, PermissionReference, advise

from ..support.policies import op
from ..support.traffic import APP_OBJECT, MCP, OID, ROTATION_BOT, TENANT, USER, allowed, denied, write_flows

REFERENCE = PermissionReference.load()


def test_the_reference_ships_with_its_license():
    assert DATA.is_file() and DATA.stat().st_size > 1_000_000
    license_text = DATA.with_name("LICENSE").read_text()
    assert "MIT" in license_text and "Microsoft" in license_text
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"policy/graph-permissions/*"' in pyproject  # installed as package data


@pytest.mark.parametrize("method, target, least", [
    ("GET", "/v1.0/users", ["User.ReadBasic.All"]),
    ("GET", f"/v1.0/users/{USER}", ["User.ReadBasic.All"]),
    ("GET", "/v1.0/users('adele@contoso.com')", ["User.ReadBasic.All"]),
    ("GET", "/v1.0/groups/x/members", ["GroupMember.ReadBasic.All"]),
    ("GET", "/v1.0/servicePrincipals/x/appRoleAssignedTo", ["Application.Read.All"]),
    ("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword", ["Application.ReadWrite.OwnedBy"]),
    ("POST", f"/v1.0/applications(appId='{MCP}')/addPassword", ["Application.ReadWrite.OwnedBy"]),
    ("PATCH", f"/v1.0/users/{USER}", ["User.ReadWrite.All"]),
    # Correction in code: the data marks Group-NestingSupport.ReadWrite.All least for GET /groups too.
    ("GET", "/v1.0/groups", ["Group.ReadBasic.All"]),
    ("GET", "/v1.0/me", []),  # delegated only: no application permission allows it
])
def test_least_privileged_application_permission_of_known_operations(method, target, least):
    assert [p.name for p in REFERENCE.least(op(method, target))] == least


def test_levels_and_what_else_allows_an_operation():
    assert REFERENCE.permission("Directory.ReadWrite.All").level == 4
    assert REFERENCE.permission("user.read.all").name == "User.Read.All"  # as Entra spells it
    allowing = [p.name for p in REFERENCE.allowing(op("POST", "/v1.0/applications/x/addPassword"))]
    assert allowing == ["Application.ReadWrite.OwnedBy", "Application.ReadWrite.All", "Directory.ReadWrite.All"]
    assert REFERENCE.least(op("GET", "/v1.0/me"), "DelegatedWork")


def observed(*flows):
    from nhi_gateway.policy.observed import from_flow

    return [o for o in map(from_flow, flows) if o is not None]


OVERPRIVILEGED = Principal(TENANT, OID, MCP, "mcp-directory", roles=("Directory.ReadWrite.All",),
                           auth_method=AuthMethod.CERTIFICATE, token_sources=(TokenSource.BEARER,))


def test_advice_names_held_needed_and_excess_with_levels():
    [advice] = advise(observed(allowed("GET", "/v1.0/users?$top=5", who=OVERPRIVILEGED),
                               allowed("GET", f"/v1.0/users/{USER}", who=OVERPRIVILEGED)))
    assert advice.summary() == "holds Directory.ReadWrite.All (level 4); what it did needs User.ReadBasic.All (level 3)"
    assert [p.name for p in advice.excess] == ["Directory.ReadWrite.All"]
    assert [(o.operation, o.count) for o in advice.operations] == [("GET /v1.0/users", 1), ("GET /v1.0/users/{id}", 1)]


def test_a_held_least_permission_is_the_one_needed():
    [advice] = advise(observed(allowed("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword", who=ROTATION_BOT)))
    assert [p.name for p in advice.needed] == ["Application.ReadWrite.OwnedBy"]
    assert advice.excess == [] and advice.uncovered == []


def test_operations_its_roles_do_not_cover_and_unknown_ones_are_named():
    reader = Principal(TENANT, OID, MCP, "reader", roles=("User.Read.All",))
    [advice] = advise(observed(allowed("GET", "/v1.0/groups", who=reader), allowed("GET", "/v1.0/nothing", who=reader)))
    assert [o.operation for o in advice.uncovered] == ["GET /v1.0/groups"]
    assert [o.operation for o in advice.unknown] == ["GET /v1.0/nothing"]
    assert [p.name for p in advice.excess] == ["User.Read.All"]


@pytest.fixture
def recordings(tmp_path) -> Path:
    write_flows(tmp_path / "r" / "a.mitm", [
        allowed("GET", "/v1.0/users?$top=5", who=OVERPRIVILEGED),
        denied("DELETE", f"/v1.0/users/{USER}", who=OVERPRIVILEGED),  # refused: needed nothing
        allowed("POST", f"/v1.0/applications/{APP_OBJECT}/addPassword", who=ROTATION_BOT),
        allowed("POST", "/tenant/oauth2/v2.0/token", who=None, host="login.microsoftonline.com"),
    ])
    return tmp_path / "r"


def test_the_command_prints_a_table_per_identity(capsys, recordings):
    assert main(["permissions", str(recordings)]) == 0
    out = capsys.readouterr().out
    assert "mcp-directory  app 5e0b1683-de22-5eac-9334-fb85a741f6ff  (application permissions)" in out
    assert "holds Directory.ReadWrite.All (level 4); what it did needs User.ReadBasic.All (level 3)" in out
    assert "excess (held, never needed): Directory.ReadWrite.All (level 4)" in out
    assert "DELETE" not in out and "oauth2" not in out
    assert "rotation-bot" in out and "Application.ReadWrite.OwnedBy (level 3)" in out


def test_the_command_writes_json(capsys, recordings):
    assert main(["permissions", "--json", "--principal", "mcp-*", str(recordings)]) == 0
    doc = json.loads(capsys.readouterr().out)
    [ident] = doc["identities"]
    assert ident["app_id"] == MCP and ident["excess"] == [{"name": "Directory.ReadWrite.All", "level": 4}]
    assert ident["operations"] == [{"operation": "GET /v1.0/users", "count": 1, "in_reference": True,
                                    "least": [{"name": "User.ReadBasic.All", "level": 3}],
                                    "covered_by": ["Directory.ReadWrite.All"]}]


def test_the_command_reports_usage_errors(capsys):
    assert main(["permissions"]) == 2
    assert "give recordings" in capsys.readouterr().err
