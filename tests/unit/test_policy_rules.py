"""Rules beyond who and what: OData limits, schedules, approve, and the precedence that ties them.

Every refusal here is read the way a caller reads it: the action, the rule named, the reason.
"""

from __future__ import annotations

import json
import random
import textwrap
from datetime import UTC, datetime, timedelta

import pytest
from mitmproxy.test import taddons, tflow, tutils

from nhi_gateway.addons.authorization import Authorization
from nhi_gateway.policy.decision import decision_of, set_decision
from nhi_gateway.addons.guard import Guard, Health
from nhi_gateway.addons.identity import PRINCIPAL_KEY
from nhi_gateway.policy.decision import Action, Decision, Stage
from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import PolicyError, PolicyStore, parse_policy
from nhi_gateway.policy.model import (
    Approval,
    ODataLimits,
    OperationMatch,
    PathPattern,
    Policy,
    PrincipalMatch,
    Rule,
    Schedule,
)
from nhi_gateway.identity.principal import AuthMethod, Principal

from ..support.policies import LOGIN_UPSTREAM, op, policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
APP = "5e0b1683-de22-5eac-9334-fb85a741f6ff"
APP_B = "11111111-2222-4333-8444-555555555555"
GROUP = "aaaaaaaa-0000-4000-8000-00000000000a"
APPROVER = "cccccccc-0000-4000-8000-00000000000c"
GRAPH = "graph.microsoft.com"

HEAD = policy_head(TENANT, upstreams=(GRAPH, LOGIN_UPSTREAM)) + """\
masking:
  profiles:
    pii: {fields: [mail]}
rules:
"""


def policy(rules: str) -> Policy:
    return parse_policy(HEAD + textwrap.dedent(rules).lstrip("\n"), "test.yaml")


def who(app: str = APP, **more) -> Principal:
    return Principal(tenant_id=TENANT, object_id="0b1c2d3e-0000-4000-8000-000000000042", app_id=app, **more)


# A Monday in summer (CEST, UTC+2) and one in winter (CET, UTC+1).
MONDAY_SUMMER = datetime(2025, 7, 7, tzinfo=UTC)
MONDAY_WINTER = datetime(2025, 1, 6, tzinfo=UTC)


# --- OData limits on allow rules ----------------------------------------------------------------

APP_READ = f"""
- id: app-read
  action: allow
  when: {{app_ids: [{APP}]}}
  odata: {{forbid_select: [keyCredentials, passwordCredentials], forbid_expand: [owners], max_top: 100}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/applications/**"]}}]
"""


@pytest.mark.parametrize(
    "query",
    [
        "",
        "$select=id,displayName",
        "$select=id&$top=100",
        "$top=0100",  # 100
        "$expand=appRoleAssignedTo($select=id)",
        "$filter=displayName eq 'keyCredentials'",  # a value, not a property asked for
        "$select=keyCredentialsX",  # another name
        "$orderby=displayName&$count=true",
        "$select=",
    ],
)
def test_an_allow_rule_allows_what_keeps_within_its_limits(query):
    d = policy(APP_READ).decide(who(), op("GET", f"/v1.0/applications?{query}"))
    assert (d.action, d.rule_id) == (Action.ALLOW, "app-read")


@pytest.mark.parametrize(
    ("query", "limit"),
    [
        ("$select=keyCredentials", "$select asks for 'keyCredentials' (odata.forbid_select)"),
        ("$select=id,KEYCREDENTIALS", "$select asks for 'keyCredentials'"),  # Graph ignores case
        ("select=keyCredentials", "$select asks for 'keyCredentials'"),  # the $ is optional
        ("%24select=keyCredentials", "$select asks for 'keyCredentials'"),
        ("$select=%6BeyCredentials", "$select asks for 'keyCredentials'"),
        ("$select=id&$select=passwordCredentials", "$select asks for 'passwordCredentials'"),
        ("$select=microsoft.graph.application/keyCredentials", "$select asks for 'keyCredentials'"),
        ("$select=keyCredentials/key", "$select asks for 'keyCredentials'"),
        ("$select=*", "$select=* asks for every property, including keyCredentials, passwordCredentials"),
        ("$select=%2A", "$select=* asks for every property"),
        (
            "$expand=appRoleAssignedTo($select=keyCredentials)",
            "$select asks for 'keyCredentials'",
        ),  # nested: an expanded object can be the same kind of entity
        ("$expand=appRoleAssignedTo($select=*)", "$select=* asks for every property"),
        ("$expand=owners", "$expand asks for 'owners' (odata.forbid_expand)"),
        ("$expand=Owners($select=id)", "$expand asks for 'owners'"),
        ("$expand=*", "$expand=* asks for every property, including owners (odata.forbid_expand)"),
        ("$expand=x($expand=owners)", "$expand asks for 'owners'"),
        ("$top=101", "$top=101 is more than 100 (odata.max_top)"),
        ("top=1000", "$top=1000 is more than 100"),
        ("$top=5&$top=500", "$top=500 is more than 100"),
        ("$expand=x($top=999)", "$top=999 is more than 100"),
        ("$top=1e3", "$top='1e3' is not a whole number (odata.max_top)"),
        ("$top=%EF%BC%91", "is not a whole number"),  # fullwidth digit one
        ("$expand=x($select=id", "its OData options cannot be judged (unbalanced '(' in $expand)"),
        ("$select=key%252Credentials", "cannot be judged"),
        ("$compute=keyCredentials as k", "$compute cannot be judged"),
    ],
)
def test_an_allow_rule_whose_limits_are_broken_does_not_allow_and_says_why(query, limit):
    o = op("GET", f"/v1.0/applications?{query}")
    d = policy(APP_READ).decide(who(), o)
    assert (d.action, d.rule_id, d.status, d.check) == (Action.DENY, "app-read", 403, "odata")
    assert d.reason.startswith(f"no rule allows {o}: rule 'app-read' would, but ")
    assert limit in d.reason


def test_another_allow_rule_still_allows_what_one_rule_s_limits_refuse():
    p = policy(APP_READ + """
- id: credential-auditor
  action: allow
  operations: [{host: graph.microsoft.com, methods: [GET], paths: ["/applications/{id}"]}]
""")
    assert p.decide(who(), op("GET", "/v1.0/applications/x?$select=keyCredentials")).rule_id == "credential-auditor"
    d = p.decide(who(), op("GET", "/v1.0/applications?$select=keyCredentials"))
    assert (d.action, d.rule_id) == (Action.DENY, "app-read")


def test_limits_of_the_rule_and_of_its_operation_both_apply():
    p = policy(f"""
- id: r
  action: allow
  odata: {{max_top: 50}}
  operations:
    - host: graph.microsoft.com
      methods: [GET]
      paths: [/users]
      odata: {{forbid_select: [mail], max_top: 10}}
    - host: graph.microsoft.com
      methods: [GET]
      paths: [/groups]
""")
    assert p.decide(who(), op("GET", "/v1.0/users?$top=10")).allowed
    assert "$top=11 is more than 10" in p.decide(who(), op("GET", "/v1.0/users?$top=11")).reason
    assert "'mail'" in p.decide(who(), op("GET", "/v1.0/users?$select=mail")).reason
    assert p.decide(who(), op("GET", "/v1.0/groups?$select=mail&$top=50")).allowed
    assert "$top=51 is more than 50" in p.decide(who(), op("GET", "/v1.0/groups?$top=51")).reason


def test_a_rule_applies_when_one_of_its_matching_operations_does():
    p = policy("""
- id: r
  action: allow
  operations:
    - {host: graph.microsoft.com, methods: [GET], paths: ["/users/**"], odata: {max_top: 10}}
    - {host: graph.microsoft.com, methods: [GET], paths: ["/users/{id}"]}
""")
    assert not p.decide(who(), op("GET", "/v1.0/users?$top=11")).allowed
    assert p.decide(who(), op("GET", "/v1.0/users/x?$top=11")).allowed  # the second one covers it


# --- OData limits on deny rules -----------------------------------------------------------------

NO_KEYS = """
- id: no-key-material
  action: deny
  odata: {forbid_select: [keyCredentials]}
  operations: [{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}]
- id: read-all
  action: allow
  operations: [{host: graph.microsoft.com, methods: [GET], paths: ["/**"]}]
"""


@pytest.mark.parametrize(
    ("target", "denied"),
    [
        ("/v1.0/applications", False),
        ("/v1.0/applications?$select=id,displayName", False),
        ("/v1.0/applications?$select=keyCredentials", True),
        ("/beta/servicePrincipals?select=KeyCredentials", True),
        ("/v1.0/groups/g?$expand=owners($select=keyCredentials)", True),
        ("/v1.0/users?$select=*", True),
        ("/v1.0/users?$expand=manager($select=*)", True),
        ("/v1.0/users?$expand=manager", False),
        ("/v1.0/users?$select=(", True),  # unreadable: cannot be shown to keep within
    ],
)
def test_a_deny_rule_with_limits_denies_exactly_the_requests_that_break_them(target, denied):
    d = policy(NO_KEYS).decide(who(), op("GET", target))
    if denied:
        assert (d.action, d.rule_id) == (Action.DENY, "no-key-material")
        assert d.reason.startswith("denied by rule 'no-key-material': ")
    else:
        assert (d.action, d.rule_id) == (Action.ALLOW, "read-all")


# --- approve and the precedence deny > approve > allow ------------------------------------------

APPROVAL = f"approval: {{approvers: {{users: [{APPROVER}], groups: [{GROUP}]}}, timeout: 10m, max_grant: 1h}}"


def precedence_policy(order: list[str]) -> Policy:
    rules = {
        "allow": "- {id: a, action: allow, operations: [{host: graph.microsoft.com, methods: [POST], paths: ['/applications/**']}], mask: pii}",
        "approve": "- {id: p, action: approve, %s, operations: [{host: graph.microsoft.com, methods: [POST], paths: ['/applications/{id}/addPassword']}]}" % APPROVAL,
        "deny": "- {id: d, action: deny, when: {auth_methods: [client_secret]}, operations: [{host: graph.microsoft.com, methods: [POST], paths: ['/applications/**']}]}",
    }
    return policy("\n".join(rules[k] for k in order) + "\n")


ORDERS = [["allow", "approve", "deny"], ["deny", "approve", "allow"], ["approve", "allow", "deny"],
          ["allow", "deny", "approve"]]


@pytest.mark.parametrize("order", ORDERS)
def test_deny_beats_approve_beats_allow_in_any_file_order(order):
    p = precedence_policy(order)
    add = op("POST", "/v1.0/applications/x/addPassword")
    secret_holder = who(auth_method=AuthMethod.CLIENT_SECRET)
    assert p.decide(secret_holder, add).rule_id == "d"
    assert p.decide(secret_holder, add).action is Action.DENY
    d = p.decide(who(auth_method=AuthMethod.CERTIFICATE), add)
    assert (d.action, d.rule_id) == (Action.APPROVE, "p")
    d = p.decide(who(), op("POST", "/v1.0/applications/x/addKey"))
    assert (d.action, d.rule_id) == (Action.ALLOW, "a")
    d = p.decide(who(), op("POST", "/v1.0/users/x"))
    assert (d.action, d.rule_id, d.reason) == (Action.DENY, None, f"no rule allows {op('POST', '/v1.0/users/x')}")


def test_an_approve_decision_is_not_an_allow():
    d = precedence_policy(["approve"]).decide(who(), op("POST", "/v1.0/applications(appId='x')/addPassword"))
    assert d.action is Action.APPROVE and d.needs_approval and not d.allowed
    assert (d.stage, d.status, d.code, d.rule_id) == (Stage.POLICY, 403, "Authorization_RequestDenied", "p")
    assert d.reason == "approval required by rule 'p'"
    assert d.extra["approval"] == {"users": [APPROVER], "groups": [GROUP], "timeout_seconds": 600,
                                   "max_grant_seconds": 3600}
    assert Decision.from_dict(json.loads(json.dumps(d.to_dict()))) == d  # survives flow metadata


def test_the_first_approve_rule_decides_and_picks_the_mask():
    p = policy(f"""
- {{id: p1, action: approve, {APPROVAL}, mask: pii, operations: [{{host: graph.microsoft.com, methods: [POST], paths: [/x]}}]}}
- {{id: p2, action: approve, {APPROVAL}, operations: [{{host: graph.microsoft.com, methods: [POST], paths: ["/**"]}}]}}
""")
    d = p.decide(who(), op("POST", "/v1.0/x"))
    assert (d.rule_id, d.mask_profile) == ("p1", "pii")
    assert p.decide(who(), op("POST", "/v1.0/y")).rule_id == "p2"


def test_approve_rules_carry_what_the_approvals_feature_needs():
    p = policy(f"""
- id: p
  action: approve
  approval:
    approvers:
      users: [{APPROVER.upper()}]
  operations: [{{host: graph.microsoft.com, methods: [POST], paths: [/x]}}]
- id: q
  action: approve
  approval: {{approvers: {{groups: [{GROUP}]}}, timeout: 1h, max_grant: 1h30m}}
  operations: [{{host: graph.microsoft.com, methods: [POST], paths: [/y]}}]
""")
    assert p.rule("p").approval == Approval(frozenset({APPROVER}), frozenset(), 300, None)
    assert p.rule("q").approval == Approval(frozenset(), frozenset({GROUP}), 3600, 5400)
    assert all(r.approval is None for r in precedence_policy(["allow", "deny"]).rules)


def test_timeout_and_max_grant_accept_any_duration_from_one_second():
    p = policy(f"""
- id: q
  action: approve
  approval: {{approvers: {{users: [{APPROVER}]}}, timeout: 1s, max_grant: 1s}}
  operations: [{{host: graph.microsoft.com, methods: [POST], paths: [/y]}}]
""")
    assert p.rule("q").approval == Approval(frozenset({APPROVER}), frozenset(), 1, 1)


def _approve_flow(policy_text: str):
    """A request for an operation that an approve rule covers, run through Authorization and the
    Guard as the gateway chains them (no approval stage: this gateway has none yet)."""
    store = PolicyStore(parse_policy(policy_text, "p.yaml"))
    f = tflow.tflow(req=tutils.treq(method=b"POST", scheme=b"https", host=GRAPH, port=443,
                                   authority=b"", path=b"/v1.0/applications/x/addPassword",
                                   headers=((b"host", GRAPH.encode()),), content=b"{}"))
    f.metadata[PRINCIPAL_KEY] = who(auth_method=AuthMethod.CERTIFICATE)
    return store, f


async def test_the_chain_refuses_an_approve_decision_with_a_readable_403():
    store, f = _approve_flow(HEAD + "- {id: rotate, action: approve, %s, operations: [{host: graph.microsoft.com, methods: [POST], paths: ['/applications/{id}/addPassword']}]}\n" % APPROVAL)
    authz, guard = Authorization(store), Guard(Health())
    with taddons.context(authz, guard) as tctx:
        await tctx.cycle(authz, f)  # request hook
        guard.request(f)
    assert f.response is not None and f.response.status_code == 403  # answered: never forwarded
    body = json.loads(f.response.content)["error"]
    assert body["code"] == "Authorization_RequestDenied"
    # Either authorization refuses it naming the rule, or (when it leaves APPROVE to an approval
    # stage, which this chain lacks) the guard refuses it: never an allow, never a status 0.
    assert body["message"] in ("approval required by rule 'rotate'",
                               "no explicit allow decision was made for this request")
    assert not decision_of(f).allowed


async def test_the_guard_refuses_an_approve_decision_that_reached_it():
    """Whatever a future stage does with APPROVE, the last stage passes only ALLOW."""
    f = tflow.tflow()
    pending = precedence_policy(["approve"]).decide(who(), op("POST", "/v1.0/applications/x/addPassword"))
    set_decision(f, pending)
    guard = Guard(Health())
    with taddons.context(guard):
        guard.request(f)
    assert f.response is not None and f.response.status_code == 403
    assert decision_of(f).stage is Stage.GUARD
    assert "no explicit allow decision" in decision_of(f).reason


# --- schedules ----------------------------------------------------------------------------------

OFFICE = """
- id: office
  action: allow
  schedule: {days: [mon-fri], hours: ["08:00-12:00", "13:00-18:00"], timezone: Europe/Berlin}
  operations: [{host: graph.microsoft.com, methods: [GET], paths: [/users]}]
"""


@pytest.mark.parametrize(
    ("at", "allowed"),
    [
        (MONDAY_SUMMER + timedelta(hours=6), True),  # 08:00 CEST
        (MONDAY_SUMMER + timedelta(hours=5, minutes=59), False),  # 07:59 CEST
        (MONDAY_WINTER + timedelta(hours=7), True),  # 08:00 CET: the offset follows the date
        (MONDAY_WINTER + timedelta(hours=6), False),  # 07:00 CET
        (MONDAY_SUMMER + timedelta(hours=10), False),  # 12:00: the end is exclusive
        (MONDAY_SUMMER + timedelta(hours=11), True),  # 13:00
        (MONDAY_SUMMER + timedelta(hours=15, minutes=59, seconds=59), True),  # 17:59:59
        (MONDAY_SUMMER + timedelta(hours=16), False),  # 18:00
        (MONDAY_SUMMER + timedelta(days=4, hours=12), True),  # Friday 12:00 UTC = 14:00 CEST
        (MONDAY_SUMMER + timedelta(days=4, hours=10, minutes=30), False),  # Friday 12:30 CEST: lunch
        (MONDAY_SUMMER + timedelta(days=5, hours=8), False),  # Saturday
        (MONDAY_SUMMER - timedelta(hours=1), False),  # Sunday 23:00 UTC = Monday 01:00 CEST
    ],
)
def test_a_rule_matches_only_inside_its_schedule(at, allowed):
    p = policy(OFFICE)
    d = p.decide(who(), op("GET", "/v1.0/users"), at)
    assert d.allowed is allowed
    assert p.rules[0].matches(who(), op("GET", "/v1.0/users"), at) is allowed


def test_a_deny_rule_out_of_its_schedule_denies_nothing():
    p = policy("""
- id: no-night-writes
  action: deny
  schedule: {hours: ["00:00-06:00", "22:00-24:00"], timezone: UTC}
  operations: [{host: graph.microsoft.com, methods: [PATCH], paths: ["/**"]}]
- id: writes
  action: allow
  operations: [{host: graph.microsoft.com, methods: [PATCH], paths: ["/**"]}]
""")
    patch = op("PATCH", "/v1.0/users/x")
    assert p.decide(who(), patch, MONDAY_SUMMER + timedelta(hours=23, minutes=30)).rule_id == "no-night-writes"
    assert p.decide(who(), patch, MONDAY_SUMMER + timedelta(hours=3)).rule_id == "no-night-writes"
    assert p.decide(who(), patch, MONDAY_SUMMER + timedelta(hours=12)).rule_id == "writes"


@pytest.mark.parametrize(
    ("schedule", "at", "in_force"),
    [
        ("{valid_from: 2025-07-01T00:00:00Z}", datetime(2025, 6, 30, 23, 59, tzinfo=UTC), False),
        ("{valid_from: 2025-07-01T00:00:00Z}", datetime(2025, 7, 1, tzinfo=UTC), True),
        ("{valid_until: '2025-07-01T02:00:00+02:00'}", datetime(2025, 6, 30, 23, 59, tzinfo=UTC), True),
        ("{valid_until: '2025-07-01T02:00:00+02:00'}", datetime(2025, 7, 1, tzinfo=UTC), False),  # exclusive
        # without an offset, the time is read in the schedule's timezone
        ("{valid_until: '2025-07-01T02:00:00', timezone: Europe/Berlin}", datetime(2025, 6, 30, 23, 59, tzinfo=UTC), True),
        ("{valid_until: '2025-07-01T02:00:00', timezone: Europe/Berlin}", datetime(2025, 7, 1, 0, 0, tzinfo=UTC), False),
        ("{days: [fri-mon], timezone: UTC}", datetime(2025, 7, 6, 12, tzinfo=UTC), True),  # Sunday, wraps
        ("{days: [fri-mon], timezone: UTC}", datetime(2025, 7, 8, 12, tzinfo=UTC), False),  # Tuesday
        ("{days: [sat, SUN], timezone: UTC}", datetime(2025, 7, 6, 12, tzinfo=UTC), True),
        ("{days: mon, timezone: UTC}", datetime(2025, 7, 7, 12, tzinfo=UTC), True),  # one string is one item
        ("{hours: '22:00-24:00', timezone: UTC}", datetime(2025, 7, 7, 23, 59, 59, tzinfo=UTC), True),
        ("{hours: '22:00-24:00', timezone: UTC}", datetime(2025, 7, 8, 0, 0, tzinfo=UTC), False),
        ("{hours: ['09:00-17:00'], timezone: America/New_York}", datetime(2025, 7, 7, 13, tzinfo=UTC), True),
        ("{hours: ['09:00-17:00'], timezone: America/New_York}", datetime(2025, 7, 7, 12, 59, tzinfo=UTC), False),
        (
            "{days: [mon-fri], hours: ['08:00-18:00'], timezone: Europe/Berlin, valid_until: 2025-07-08T00:00:00Z}",
            datetime(2025, 7, 7, 9, tzinfo=UTC),
            True,
        ),
        (
            "{days: [mon-fri], hours: ['08:00-18:00'], timezone: Europe/Berlin, valid_until: 2025-07-08T00:00:00Z}",
            datetime(2025, 7, 8, 9, tzinfo=UTC),
            False,
        ),
    ],
)
def test_schedules(schedule, at, in_force):
    p = policy(f"- {{id: r, action: allow, schedule: {schedule}, operations: [{{host: graph.microsoft.com, methods: [GET], paths: [/users]}}]}}\n")
    assert p.decide(who(), op("GET", "/v1.0/users"), at).allowed is in_force


def test_decisions_read_the_clock_only_for_scheduled_rules(monkeypatch):
    from nhi_gateway.policy import model as policy_module

    calls = []

    class Clock(datetime):
        @classmethod
        def now(cls, tz=None):
            calls.append(tz)
            return MONDAY_SUMMER + timedelta(hours=7)

    monkeypatch.setattr(policy_module, "datetime", Clock)
    p = policy(OFFICE + "- {id: plain, action: allow, operations: [{host: graph.microsoft.com, methods: [GET], paths: [/groups]}]}\n")
    assert p.decide(who(), op("GET", "/v1.0/groups")).allowed and calls == []
    assert p.decide(who(), op("GET", "/v1.0/users")).allowed and calls == [UTC]


# --- loader errors for the new keys --------------------------------------------------------------


def _at(text: str, needle: str, sub: str | None = None) -> tuple[int, int]:
    """1-based line and column of ``sub`` inside the first ``needle`` of ``text``."""
    start = text.index(needle) + (needle.index(sub) if sub else 0)
    return text.count("\n", 0, start) + 1, start - (text.rfind("\n", 0, start) + 1) + 1


OPS = "  operations: [{host: graph.microsoft.com, methods: [GET], paths: [/users]}]\n"


@pytest.mark.parametrize(
    ("rule", "sub", "message", "hint"),
    [
        # odata
        ("  odata: {forbid_select: [key credentials]}\n", "key credentials", "odata.forbid_select[0]: 'key credentials' is not a property name", "one property name"),
        ("  odata: {forbid_select: ['*']}\n", "'*'", "'*' is not a property name", "every segment"),
        ("  odata: {forbid_expand: owners}\n", "owners", "odata.forbid_expand must be a list, not a string", "write [owners]"),
        ("  odata: {max_top: 0}\n", "0}", "odata.max_top must be between 1 and 1000000, not 0", ""),
        ("  odata: {max_top: '100'}\n", "'100'", "odata.max_top must be a whole number, not a string", ""),
        ("  odata: {forbid_selects: [a]}\n", "forbid_selects", "unknown key 'forbid_selects' in rule 'r': odata", "did you mean 'forbid_select'?"),
        ("  odata: {}\n", "odata", "rule 'r': odata limits nothing", "give forbid_select"),
        # schedule
        ("  schedule: {days: [mon-fri]}\n", "days", "days and hours need a timezone", "IANA name"),
        ("  schedule: {hours: ['08:00-18:00'], timezone: Europe/Berlinn}\n", "Europe/Berlinn", "unknown time zone 'Europe/Berlinn'", "did you mean 'Europe/Berlin'?"),
        ("  schedule: {hours: ['08:00-18:00'], timezone: ../../etc/passwd}\n", "../", "unknown time zone", ""),
        ("  schedule: {days: [monday], timezone: UTC}\n", "monday", "'monday' is not a day or a range of days", "did you mean 'mon'?"),
        ("  schedule: {days: [mon-fry], timezone: UTC}\n", "mon-fry", "'mon-fry' is not a day or a range of days", "did you mean 'fri'?"),
        ("  schedule: {hours: ['8-18'], timezone: UTC}\n", "'8-18'", "'8-18' is not a range of hours", "HH:MM-HH:MM"),
        ("  schedule: {hours: ['22:00-06:00'], timezone: UTC}\n", "'22:00", "runs past midnight", '["22:00-24:00", "00:00-06:00"]'),
        ("  schedule: {hours: ['08:00-08:00'], timezone: UTC}\n", "'08:00", "is empty", ""),
        ("  schedule: {hours: ['08:60-09:00'], timezone: UTC}\n", "'08:60", "is not a time of day", ""),
        ("  schedule: {hours: ['08:00-24:30'], timezone: UTC}\n", "'08:00", "is not a time of day", ""),
        ("  schedule: {valid_from: 2025-07-01}\n", "2025", "valid_from: 2025-07-01 is a date without a time", "ISO 8601"),
        ("  schedule: {valid_from: '2025-07-01T08:00'}\n", "'2025", "has no offset and the schedule has no timezone", "timezone"),
        ("  schedule: {valid_until: tomorrow}\n", "tomorrow", "valid_until: 'tomorrow' is not a time", "ISO 8601"),
        ("  schedule: {valid_from: 2025-07-02T00:00:00Z, valid_until: 2025-07-01T00:00:00Z}\n", "2025-07-01", "valid_until (2025-07-01T00:00:00+00:00) is not after valid_from", "never be in force"),
        ("  schedule: {}\n", "schedule", "rule 'r': schedule is empty", "give days"),
        # approval
        ("  action: approve\n", "approve", "rule 'r': action approve needs 'approval'", "approvers"),
        (f"  action: approve\n  approval: {{approvers: {{}}}}\n", "approvers", "approval.approvers names nobody", "users:"),
        (f"  action: approve\n  approval: {{approvers: {{groups: [admins]}}}}\n", "admins", "approval.approvers.groups[0]: 'admins' is not a GUID", "not a name"),
        (f"  action: approve\n  approval: {{approvers: {{users: [{APPROVER}]}}, timeout: 300}}\n", "300", "approval.timeout: 300 has no unit", "300s"),
        (f"  action: approve\n  approval: {{approvers: {{users: [{APPROVER}]}}, timeout: 5 minutes}}\n", "5 minutes", "approval.timeout: '5 minutes' is not a duration", "5m"),
        (f"  action: approve\n  approval: {{approvers: {{users: [{APPROVER}]}}, timeout: 2h}}\n", "2h", "approval.timeout: 2h is outside 1s to 1h", ""),
        (f"  action: approve\n  approval: {{approvers: {{users: [{APPROVER}]}}, max_grant: 0s}}\n", "0s", "approval.max_grant: 0s is outside 1s to 7d", ""),
        (f"  action: approve\n  approval: {{approvers: {{users: [{APPROVER}]}}, max_grant: 8d}}\n", "8d", "outside 1s to 7d", ""),
        (f"  approval: {{approvers: {{users: [{APPROVER}]}}}}\n", "approval", "rule 'r': 'approval' applies to action: approve only, not allow", "remove it"),
        (f"  action: approve\n  approval: {{approvers: {{users: [{APPROVER}]}}, timout: 5m}}\n", "timout", "unknown key 'timout'", "did you mean 'timeout'?"),
    ],
)
def test_errors_for_the_new_keys_say_where_what_and_what_to_do(rule, sub, message, hint):
    body = "- id: r\n" + (rule if rule.startswith("  action:") else "  action: allow\n" + rule) + OPS
    text = HEAD + body
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    err = e.value
    assert message in err.message, str(err)
    assert hint in err.hint, str(err)
    line, col = _at(text, body, sub)
    assert (err.line, err.column) == (line, col), str(err)


@pytest.mark.parametrize(
    ("operation", "sub", "message"),
    [
        ("{host: login.microsoftonline.com, methods: [POST], paths: [/x], odata: {max_top: 1}}", "odata",
         "odata limits apply to Graph hosts only, not 'login.microsoftonline.com'"),
    ],
)
def test_odata_limits_are_for_graph_only(operation, sub, message):
    body = f"- id: r\n  action: allow\n  operations: [{operation}]\n"
    text = HEAD + body
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert message in e.value.message
    assert (e.value.line, e.value.column) == _at(text, body, sub)
    body = "- id: r\n  action: allow\n  odata: {max_top: 1}\n  operations: [{host: login.microsoftonline.com, methods: [POST], paths: [/x]}]\n"
    with pytest.raises(PolicyError, match="odata limits apply to Graph requests, but operations\\[0\\] is for"):
        parse_policy(HEAD + body, "p.yaml")


def test_the_approvals_section_names_a_webhook():
    text = HEAD.replace("rules:\n", "approvals:\n  webhook: https://hooks.example.test/T0/B0/x\nrules:\n")
    assert parse_policy(text, "p.yaml").approvals.webhook == "https://hooks.example.test/T0/B0/x"
    assert parse_policy(HEAD, "p.yaml").approvals is None
    assert parse_policy(HEAD.replace("rules:\n", "approvals: {}\nrules:\n"), "p.yaml").approvals.webhook is None


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ("http://hooks.example.test/x", "approvals.webhook: 'http://hooks.example.test/x' is not an https URL"),
        ("https://user:pw@hooks.example.test/x", "is not an https URL"),  # no credentials in the file
        ("hooks.example.test", "is not an https URL"),
        ("[1]", "approvals.webhook must be a string, not a list"),
    ],
)
def test_a_webhook_must_be_an_https_url(webhook, message):
    text = HEAD.replace("rules:\n", f"approvals:\n  webhook: {webhook}\nrules:\n")
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert message in e.value.message
    assert (e.value.line, e.value.column) == _at(text, f"webhook: {webhook}", webhook)
    with pytest.raises(PolicyError, match="unknown key 'hook' in approvals"):
        parse_policy(HEAD.replace("rules:\n", "approvals: {hook: x}\nrules:\n"), "p.yaml")


def test_a_deny_rule_takes_no_approval_and_no_mask():
    with pytest.raises(PolicyError, match="'approval' applies to action: approve only, not deny"):
        parse_policy(HEAD + f"- id: r\n  action: deny\n  approval: {{approvers: {{users: [{APPROVER}]}}}}\n" + OPS, "p.yaml")


# --- scale: the index agrees with a naive reading, at 10 and at 5,000 rules ---------------------

APPS = [f"{i:08x}-0000-4000-8000-00000000a00{i % 10}" for i in range(200)]
GROUPS = [f"{i:08x}-0000-4000-8000-00000000b00{i % 10}" for i in range(20)]
RESOURCES = ["users", "groups", "applications", "servicePrincipals", "devices", "sites", "drives", "teams"]
TAILS = ["", "/{id}", "/{id}/owners", "/{id}/addPassword", "/**", "/*/members/**", "/$count"]
QUERIES = ["", "?$select=id", "?$select=keyCredentials", "?$select=*", "?$top=50", "?$top=500",
           "?$expand=owners", "?$expand=members($select=mail)"]
TIMES = [datetime(2025, 7, 7, 9, tzinfo=UTC), datetime(2025, 7, 5, 23, tzinfo=UTC)]


def _random_rule(rng: random.Random, i: int) -> Rule:
    kind = rng.random()
    if kind < 0.85:
        when = PrincipalMatch(app_ids=frozenset(rng.sample(APPS, rng.randint(1, 2))))
    elif kind < 0.93:
        when = PrincipalMatch(groups=frozenset({rng.choice(GROUPS)}), auth_methods=frozenset({AuthMethod.CERTIFICATE}))
    elif kind < 0.95:
        when = PrincipalMatch(anonymous=True)
    else:
        when = PrincipalMatch()
    if i < 3:
        when = PrincipalMatch(app_ids=frozenset({APPS[0]}))
    operations = []
    for _ in range(rng.randint(1, 2)):
        text = "/" + rng.choice(RESOURCES) + rng.choice(TAILS)
        segments = tuple("*" if s.startswith("{") else s.casefold() for s in text[1:].split("/"))
        versions = rng.choice([frozenset({"v1.0"}), frozenset({"v1.0", "beta"})])
        methods = rng.choice([frozenset({"GET"}), frozenset({"POST"}), frozenset({"*"})])
        limits = None
        if rng.random() < 0.15:
            limits = ODataLimits(forbid_select=("keyCredentials",) if rng.random() < 0.5 else (),
                                 forbid_expand=("owners",) if rng.random() < 0.5 else (),
                                 max_top=rng.choice([None, 100]))
        operations.append(OperationMatch(GRAPH, methods, (PathPattern(text, segments, versions),), limits))
    # The first rules of every policy hold one of each kind, so even 10 rules mix them all.
    action = [Action.DENY, Action.APPROVE, Action.ALLOW][i] if i < 3 else \
        rng.choices([Action.ALLOW, Action.DENY, Action.APPROVE], weights=[7, 2, 1])[0]
    odata = ODataLimits(forbid_select=("keyCredentials",), max_top=100) if rng.random() < 0.1 or i == 2 else None
    schedule = None
    if rng.random() < 0.1:
        schedule = Schedule(frozenset(range(5)), ((8 * 3600, 18 * 3600),), "Europe/Berlin")
    approval = Approval(frozenset({APPROVER})) if action is Action.APPROVE else None
    mask = rng.choice([None, "pii"]) if action is not Action.DENY else None
    return Rule(f"r{i}", action, tuple(operations), when, mask, odata=odata, schedule=schedule, approval=approval)


def _naive(rules: list[Rule], default_profile, caller, o: Operation, at: datetime) -> tuple:
    """The documented precedence read off every rule in turn, without the index."""
    in_scope = [r for r in rules if r.when.matches(caller) and any(om.matches(o) for om in r.operations)
                and (r.schedule is None or r.schedule.contains(at))]
    applying = [r for r in in_scope if r.judge(o)[0]]
    for action in (Action.DENY, Action.APPROVE, Action.ALLOW):
        first = next((r for r in applying if r.action is action), None)
        if first is not None:
            mask = None if action is Action.DENY else (first.mask or default_profile)
            return action, first.id, mask
    limited = next((r for r in in_scope if r.action is not Action.DENY), None)
    return Action.DENY, limited.id if limited else None, None


def _requests_for(rng: random.Random, rules: list[Rule], n: int) -> list[Operation]:
    """Requests aimed at what a sample of the rules name, with assorted OData options."""
    out = []
    for rule in rng.sample(rules, min(n, len(rules))):
        om = rng.choice(rule.operations)
        pattern = om.paths[0]
        segments = [{"*": "x", "**": rng.choice(["", "y", "y/z"])}.get(s, s) for s in pattern.segments]
        path = "/".join(s for s in segments if s)
        method = rng.choice(sorted(om.methods - {"*"}) or ["GET", "POST"])
        version = rng.choice(sorted(pattern.versions))
        out.append(op(method, f"/{version}/{path}{rng.choice(QUERIES)}"))
    return out


def _callers_for(rng: random.Random, rules: list[Rule]) -> list:
    apps = sorted({a for r in rules for a in (r.when.app_ids or ())})
    callers: list = [None, who(app=APP_B), who(app=APPS[0], auth_method=AuthMethod.CERTIFICATE)]
    for _ in range(10):
        callers.append(who(app=rng.choice(apps or APPS), groups=tuple(rng.sample(GROUPS, 2)),
                           auth_method=rng.choice([AuthMethod.CERTIFICATE, AuthMethod.CLIENT_SECRET])))
    return callers


@pytest.mark.parametrize("size", [10, 5000])
def test_indexed_decisions_equal_a_naive_reading_at_10_and_5000_rules(size):
    """Correctness at scale, not speed (timings belong to the benchmark): the indexed decision is
    the one a plain reading of every rule gives, for policies of 10 and 5,000 rules that mix
    principals, paths, methods, versions, OData limits, schedules and all three actions."""
    rng = random.Random(size)
    rules = [_random_rule(rng, i) for i in range(size)]
    p = Policy("random", None, [], {"pii": None}, rules, default_profile="pii")  # type: ignore[arg-type]
    ops = _requests_for(rng, rules[:3], 3) + _requests_for(rng, rules, 30)
    callers = _callers_for(rng, rules)
    seen: dict = {}
    for caller in callers:
        for o in ops:
            for at in TIMES:
                d = p.decide(caller, o, at)
                assert (d.action, d.rule_id, d.mask_profile) == _naive(rules, "pii", caller, o, at), (caller, o, at)
                assert [r.id for r in p.matching_rules(caller, o, at)] == [
                    r.id for r in rules if r.matches(caller, o, at)]
                kind = d.action if d.rule_id is None or d.check != "odata" else "odata"
                seen[kind] = seen.get(kind, 0) + (d.rule_id is not None)
    # The sample reaches every kind of outcome, not only the default refusal.
    assert all(seen.get(k, 0) > 0 for k in (Action.ALLOW, Action.DENY, Action.APPROVE, "odata")), seen
