"""No query oracles: a caller may not filter, sort or search on what it may not read.

``$filter=startswith(mail,'a')``, ``$orderby=mail`` or ``$search="mail:a"`` tell a caller whose
answers have ``mail`` masked every address, one character at a time, without Graph ever
returning one. Such a request is refused (403, naming the property) when the caller's mask profile
hides the property, in any spelling and at any depth; ``allow_select`` (an allow-list) and
``forbid_select`` bound filters, sorts and searches as they bound ``$select``.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from nhi_gateway.identity.principal import Principal
from nhi_gateway.policy.batch import judge_batch
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.loader import PolicyError, parse_policy
from nhi_gateway.policy.model import Policy
from nhi_gateway.policy.operation import Operation, query_properties, read_odata

from ..support import policies
from ..support.policies import policy_head

TENANT = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
APP = "5e0b1683-de22-5eac-9334-fb85a741f6ff"

HEAD = policy_head(TENANT) + """\
masking:
  profiles:
    pii:
      fields: {mail: partial, employeeId: redact}
      paths: ["$.value[*].mobilePhone"]
      detectors: [email]
    names-only:
      fields: [surname]
rules:
"""

READ = f"""
- id: directory-read
  action: allow
  when: {{app_ids: [{APP}]}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users/**", "/groups/**"]}}]
  mask: pii
"""


def policy(rules: str = READ) -> Policy:
    return parse_policy(HEAD + textwrap.dedent(rules).lstrip("\n"), "test.yaml")


def who() -> Principal:
    return Principal(tenant_id=TENANT, object_id="0b1c2d3e-0000-4000-8000-000000000042", app_id=APP)


def op(target: str, method: str = "GET") -> Operation:
    return policies.op(method, target)


@pytest.mark.parametrize(("target", "field"), [
    ("/v1.0/users?$filter=startswith(mail,'a')", "mail"),
    ("/v1.0/users?$filter=MAIL eq 'adele@contoso.com'", "mail"),  # Graph ignores the case of names
    ("/v1.0/users?%24filter=startswith(%6Dail,'a')", "mail"),  # percent-encoded, decoded once
    ("/beta/users?filter=startswith(mail,'a')", "mail"),  # the $ is optional
    ("/v1.0/users?$filter=displayName eq 'x' and startswith(employeeId,'E1')", "employeeId"),
    ("/v1.0/users?$orderby=mail desc", "mail"),
    ("/v1.0/users?$orderby=displayName,employeeId", "employeeId"),
    ("/v1.0/users?$search=\"mail:adele\"", "mail"),
    ("/v1.0/users?$search=\"displayName:a\" AND \"Mail:b\"", "mail"),
    ("/v1.0/users/$count?$filter=startswith(mail,'a')", "mail"),  # the count is the oracle
    ("/v1.0/users?$count=true&$filter=startswith(mail,'a')&$top=1", "mail"),
    ("/v1.0/groups?$expand=members($filter=startswith(mail,'a'))", "mail"),
    ("/v1.0/groups?$expand=members($select=id;$orderby=mail)", "mail"),
    ("/v1.0/groups?$expand=owners($expand=manager($filter=startswith(employeeId,'E')))", "employeeId"),
    ("/v1.0/users?$filter=startswith(mobilePhone,'+1 4')", "mobilePhone"),  # the name a path ends on
    ("/v1.0/users?$filter=otherMails/any(x:startswith(x,'a'))", "otherMails"),  # what the email detector hides
    ("/v1.0/users?$filter=proxyAddresses/any(p:p eq 'SMTP:a@b.c')", "proxyAddresses"),
    ("/v1.0/users?$filter=microsoft.graph.user/mail eq 'x'", "mail"),
    ("/v1.0/users?$filter=@p&@p=startswith(mail,'a')", "mail"),  # a parameter alias is an expression too
])
def test_filter_sort_or_search_on_a_masked_property_is_refused_naming_it(target, field):
    d = policy().decide(who(), op(target))
    assert d.action is Action.DENY and d.status == 403 and d.check == "masking", d.reason
    assert f"'{field}'" in d.reason and "pii" in d.reason and d.rule_id == "directory-read"


@pytest.mark.parametrize(("target", "words"), [
    ("/v1.0/users?$search=\"adele\"", "default properties"),  # no property named: it searches them all
    ("/v1.0/users?$search=adele", "default properties"),
    ("/v1.0/users?$filter=startswith(%256Dail,'a')", "cannot be judged"),  # double-encoded
    ("/v1.0/users?$filter=startswith(mail,'a)", "cannot be judged"),  # unterminated quote
    ("/v1.0/users?$apply=filter(startswith(mail,'a'))", "cannot be judged"),
])
def test_what_cannot_be_judged_under_a_mask_profile_is_refused(target, words):
    d = policy().decide(who(), op(target))
    assert d.action is Action.DENY and d.status == 403 and d.check == "masking", d.reason
    assert words in d.reason


@pytest.mark.parametrize("target", [
    "/v1.0/users?$filter=startswith(displayName,'a')",
    "/v1.0/users?$filter=displayName eq 'mail'",  # a value, not a property
    "/v1.0/users?$filter=displayName eq 'it''s mail'",
    "/v1.0/users?$orderby=displayName desc&$count=true",
    "/v1.0/users?$search=\"displayName:adele\"",
    "/v1.0/users?$select=id,mail",  # asking for a masked property is no oracle: it comes back masked
    "/v1.0/users?$filter=accountEnabled eq true&$top=5",
    "/v1.0/groups?$expand=members($filter=startswith(displayName,'a'))",
])
def test_unmasked_properties_stay_usable(target):
    d = policy().decide(who(), op(target))
    assert d.action is Action.ALLOW, d.reason


def test_only_the_callers_own_profile_counts():
    rules = READ.replace("mask: pii", "mask: names-only")
    assert policy(rules).decide(who(), op("/v1.0/users?$filter=startswith(mail,'a')")).allowed
    d = policy(rules).decide(who(), op("/v1.0/users?$orderby=surname"))
    assert not d.allowed and "'surname'" in d.reason


def test_inside_a_batch_each_item_is_judged_for_oracles():
    batch = {"requests": [
        {"id": "1", "method": "GET", "url": "/users?$select=id"},
        {"id": "2", "method": "GET", "url": "users?$filter=startswith(mail,'a')"},
    ]}
    outer = op("/v1.0/$batch", "POST")
    d = judge_batch(policy(), who(), outer, json.dumps(batch).encode(), "application/json")
    assert d.action is Action.DENY and d.status == 403 and "'mail'" in d.reason
    assert [e["decision"] for e in d.extra["batch"]] == ["allow", "deny"]


# --- allow_select and forbid_select bound filters, sorts and searches too ------------------------


ALLOW_SELECT = f"""
- id: directory-read
  action: allow
  when: {{app_ids: [{APP}]}}
  odata: {{allow_select: [id, displayName, jobTitle, members]}}
  operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/users/**", "/groups/**"]}}]
"""


@pytest.mark.parametrize("target", [
    "/v1.0/users?$select=id,displayName",
    "/v1.0/users?$select=ID,DisplayName&$filter=startswith(displayName,'a')&$orderby=jobTitle",
    "/v1.0/users?$select=id&$search=\"displayName:a\"",
    "/v1.0/groups?$select=id&$expand=members($select=id,displayName)",
    "/v1.0/users?$select=microsoft.graph.user/displayName",
])
def test_allow_select_allows_only_the_listed_properties(target):
    d = policy(ALLOW_SELECT).decide(who(), op(target))
    assert d.action is Action.ALLOW, d.reason


@pytest.mark.parametrize(("target", "words"), [
    ("/v1.0/users", "$select is required"),
    ("/v1.0/users?$select=id,mail", "'mail'"),
    ("/v1.0/users?$select=*", "$select=*"),
    ("/v1.0/users?$select=id&$filter=startswith(mail,'a')", "'mail'"),
    ("/v1.0/users?$select=id&$orderby=employeeId", "'employeeId'"),
    ("/v1.0/users?$select=id&$search=\"mail:a\"", "'mail'"),
    ("/v1.0/groups?$select=id&$expand=members", "members"),  # an expansion without its own $select
    ("/v1.0/groups?$select=id&$expand=owners($select=id)", "'owners'"),
    ("/v1.0/groups?$select=id&$expand=members($select=mail)", "'mail'"),
])
def test_allow_select_refuses_everything_else(target, words):
    d = policy(ALLOW_SELECT).decide(who(), op(target))
    assert d.action is Action.DENY and "odata.allow_select" in d.reason and words.lower() in d.reason.lower(), d.reason


def test_forbid_select_also_forbids_filtering_sorting_and_searching():
    rules = f"""
    - id: no-key-material
      action: deny
      odata: {{forbid_select: [keyCredentials]}}
      operations: [{{host: graph.microsoft.com, methods: ["*"], paths: ["/**"]}}]
    - id: apps
      action: allow
      operations: [{{host: graph.microsoft.com, methods: [GET], paths: ["/applications/**"]}}]
    """
    p = policy(rules)
    d = p.decide(who(), op("/v1.0/applications?$filter=keyCredentials/any(k:k/displayName eq 'x')"))
    assert d.action is Action.DENY and d.rule_id == "no-key-material" and "'keyCredentials'" in d.reason
    assert p.decide(who(), op("/v1.0/applications?$filter=displayName eq 'keyCredentials'")).allowed


@pytest.mark.parametrize(("text", "words"), [
    ("allow_select: []", "must not be empty"),
    ("allow_select: [mail/x]", "not a property name"),
    ("allow_select: [id, '*']", "not a property name"),
])
def test_allow_select_mistakes_stop_the_load(text, words):
    rules = ALLOW_SELECT.replace("allow_select: [id, displayName, jobTitle, members]", text)
    with pytest.raises(PolicyError, match=words):
        policy(rules)


# --- reading the options --------------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "names"), [
    ("startswith(mail,'a')", {"mail"}),
    ("mail eq 'x' and displayName eq 'mail'", {"mail", "displayname"}),
    ("otherMails/any(x:startswith(x,'a'))", {"othermails"}),
    ("manager/mail eq 'x'", {"manager", "mail"}),
    ("microsoft.graph.user/mail eq 'x'", {"mail"}),
    ("accountEnabled eq true and createdDateTime ge 2024-01-01T00:00:00Z", {"accountenabled", "createddatetime"}),
    ("id in ('a', 'b')", {"id"}),
    ("mail desc,displayName", {"mail", "displayname"}),
])
def test_query_properties(expression, names):
    assert query_properties(expression) == names


def test_filters_sorts_and_searches_are_read_at_every_depth():
    q = read_odata((("$filter", "a eq 1"), ("$expand", "m($filter=b eq 2;$orderby=c;$search=\"d:e\")"),
                    ("$orderby", "f"), ("@p", "g eq 1")))
    assert q.filters == ("a eq 1", "b eq 2", "g eq 1") and q.orderbys == ("c", "f") and q.searches == ('"d:e"',)


def test_a_path_hides_the_property_it_starts_in_not_every_member_of_the_same_name():
    head = HEAD.replace('paths: ["$.value[*].mobilePhone"]',
                        'paths: ["$.value[*].mobilePhone", "$..passwordCredentials[*].displayName"]')
    p = parse_policy(head + textwrap.dedent(READ).lstrip("\n"), "test.yaml")
    assert p.decide(who(), op("/v1.0/users?$filter=startswith(displayName,'a')")).allowed
    d = p.decide(who(), op("/v1.0/users?$filter=passwordCredentials/any(c:startswith(c/displayName,'a'))"))
    assert not d.allowed and "'passwordCredentials'" in d.reason
