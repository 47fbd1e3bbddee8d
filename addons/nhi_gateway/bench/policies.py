"""Realistic policies of any size, for the benchmark.

A policy of a real organisation grows with its workloads: a handful of deny rules that hold for
everyone (no credential minting, no role assignments, no conditional-access edits), the token
endpoint for anonymous callers, and then a few allow rules per workload, each naming its app and
the Graph resources that workload needs. The generator builds exactly that shape, from a
catalogue of common workload kinds, for ``n`` rules in all. ``policies/bench.yaml`` is its output
for 50 rules::

    python -m nhi_gateway.bench policy --rules 50 > policies/bench.yaml

``approve=True`` makes the benchmark caller's rule an ``approve`` rule (the same operations and
mask), which the grant-lookup measurement runs with a grant covering the caller.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, replace

# The look-alike tenant and its mcp-directory client (stable GUIDs, as in policies/example.yaml).
TENANT_ID = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
BENCH_APP_ID = "5e0b1683-de22-5eac-9334-fb85a741f6ff"  # mcp-directory: the benchmark's caller
BENCH_RULE_ID = "mcp-directory-read"
# The person the approve variant names as its approver (who gives the benchmark's grant).
BENCH_APPROVER = "0f573d36-fa84-5b0a-917c-50d218f4571b"
_NAMESPACE = uuid.UUID("6b1f0c4e-2d7a-4e55-9a31-0c8d5b2e7f10")

GRAPH = "graph.microsoft.com"
LOGIN = "login.microsoftonline.com"
WRITES = ["POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True)
class Op:
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    versions: tuple[str, ...] | None = None
    host: str = GRAPH


@dataclass(frozen=True)
class RuleSpec:
    id: str
    description: str
    action: str
    operations: tuple[Op, ...]
    when: dict | None = None
    mask: str | None = None
    approval: dict | None = None  # approve rules: approvers (user ids), timeout, max_grant


def _op(methods, *paths, versions=None, host=GRAPH) -> Op:
    return Op(tuple(methods), tuple(paths), tuple(versions) if versions else None, host)


# Guardrails that hold for every caller: a compromised workload's ways to make itself permanent
# or more powerful.
GUARDRAILS: tuple[RuleSpec, ...] = (
    RuleSpec("no-credential-minting", "Nobody adds secrets, certificates or federated credentials.", "deny", (
        _op(["POST"], "/applications/{id}/addPassword", "/applications/{id}/addKey",
            "/servicePrincipals/{id}/addPassword", "/servicePrincipals/{id}/addKey"),
        _op(["POST", "PATCH", "DELETE"], "/applications/{id}/federatedIdentityCredentials/**"),
    )),
    RuleSpec("no-role-assignments", "Directory roles are assigned by people, not workloads.", "deny", (
        _op(WRITES, "/roleManagement/directory/roleAssignments/**",
            "/roleManagement/directory/roleEligibilityScheduleRequests/**",
            "/directoryRoles/{id}/members/**"),
    )),
    RuleSpec("no-app-role-grants", "No workload grants application permissions.", "deny", (
        _op(["POST", "DELETE"], "/servicePrincipals/{id}/appRoleAssignedTo/**",
            "/servicePrincipals/{id}/appRoleAssignments/**", "/oauth2PermissionGrants/**"),
    )),
    RuleSpec("no-conditional-access-edits", "Conditional access is changed through change control.", "deny", (
        _op(WRITES, "/identity/conditionalAccess/**", "/policies/**"),
    )),
    RuleSpec("no-app-deletion", "Applications and service principals are not deleted by workloads.", "deny", (
        _op(["DELETE"], "/applications/{id}", "/servicePrincipals/{id}"),
    )),
    RuleSpec("no-secret-writes", "Identities holding a static secret may not change the directory.", "deny", (
        _op(WRITES, "/users/**", "/groups/**", "/applications/**", "/servicePrincipals/**"),
    ), when={"auth_methods": ["client_secret", "public_client", "unknown"]}),
    RuleSpec("no-domain-changes", "Verified domains and federation settings stay as they are.", "deny", (
        _op(WRITES, "/domains/**", "/organization/**"),
    )),
    RuleSpec("no-mail-forwarding-rules", "No inbox rules that forward mail out.", "deny", (
        _op(["POST", "PATCH"], "/users/{id}/mailFolders/{id}/messageRules/**"),
    )),
    RuleSpec("no-bitlocker-keys", "BitLocker recovery keys are read by people only.", "deny", (
        _op(["GET"], "/informationProtection/bitlocker/recoveryKeys/**", versions=["v1.0", "beta"]),
    )),
    RuleSpec("no-beta-writes", "Writes go through v1.0 only: beta behaviour changes without notice.", "deny", (
        _op(WRITES, "/**", versions=["beta"]),
    )),
)

TOKEN_ENDPOINT = RuleSpec(
    "token-endpoint", "Clients obtain tokens with client credentials.", "allow", (
        _op(["POST"], "/{tenant}/oauth2/v2.0/token", host=LOGIN),
        _op(["GET"], "/{tenant}/v2.0/.well-known/openid-configuration", "/common/discovery/instance", host=LOGIN),
    ), when={"anonymous": True})

# Workload kinds: (name, rules as (suffix, description, operations, mask)).
WORKLOADS: tuple[tuple[str, tuple[tuple[str, str, tuple[Op, ...], str | None], ...]], ...] = (
    ("directory-reader", (
        ("read", "reads users and groups", (_op(["GET"], "/users/**", "/groups/**"),), "directory-pii"),
    )),
    ("group-sync", (
        ("read", "reads groups and members", (_op(["GET"], "/groups/**"),), "directory-pii"),
        ("members", "adds and removes members", (
            _op(["POST"], "/groups/{id}/members/$ref"),
            _op(["DELETE"], "/groups/{id}/members/{id}/$ref"),
        ), None),
    )),
    ("mail-sender", (
        ("send", "sends notifications", (_op(["POST"], "/users/{id}/sendMail", versions=["v1.0"]),), None),
    )),
    ("mail-archiver", (
        ("read", "reads mailboxes", (_op(["GET"], "/users/{id}/messages/**", "/users/{id}/mailFolders/**"),),
         "mail-content"),
    )),
    ("calendar-bot", (
        ("read", "reads calendars", (_op(["GET"], "/users/{id}/events/**", "/users/{id}/calendar/**",
                                         "/users/{id}/calendarView"),), "directory-pii"),
        ("write", "books meetings", (_op(["POST", "PATCH"], "/users/{id}/events/**"),), None),
    )),
    ("file-sync", (
        ("read", "reads drives", (_op(["GET"], "/drives/{id}/items/**", "/drives/{id}/root/**"),), None),
        ("write", "uploads files", (_op(["PUT", "POST"], "/drives/{id}/items/**"),), None),
    )),
    ("sites-crawler", (
        ("read", "crawls SharePoint sites", (_op(["GET"], "/sites/**"),), None),
    )),
    ("teams-notifier", (
        ("channels", "lists channels", (_op(["GET"], "/teams/{id}/channels/**"),), None),
        ("post", "posts to channels", (_op(["POST"], "/teams/{id}/channels/{id}/messages"),), None),
    )),
    ("device-inventory", (
        ("read", "reads devices", (_op(["GET"], "/devices/**"),
                                   _op(["GET"], "/deviceManagement/managedDevices/**", versions=["beta"])),
         "device-pii"),
    )),
    ("audit-collector", (
        ("read", "collects sign-in and audit logs", (
            _op(["GET"], "/auditLogs/signIns", "/auditLogs/directoryAudits", "/auditLogs/provisioning",
                versions=["v1.0"]),
            _op(["GET"], "/reports/**"),
        ), "directory-pii"),
    )),
    ("app-inventory", (
        ("read", "inventories applications", (_op(["GET"], "/applications/**", "/servicePrincipals/**"),),
         "credentials"),
    )),
    ("security-triage", (
        ("read", "reads alerts and incidents", (_op(["GET"], "/security/alerts_v2/**", "/security/incidents/**"),),
         None),
        ("update", "updates alert status", (_op(["PATCH"], "/security/alerts_v2/{id}"),), None),
    )),
    ("license-reporter", (
        ("read", "reads licences", (_op(["GET"], "/subscribedSkus", "/users/{id}/licenseDetails"),), None),
    )),
)

MASK_PROFILES = {
    "directory-pii": ["mail", "otherMails", "userPrincipalName", "mobilePhone", "businessPhones", "faxNumber",
                      "employeeId", "streetAddress", "onPremisesSamAccountName", "onPremisesImmutableId",
                      "onPremisesSecurityIdentifier", "issuerAssignedId"],
    "mail-content": ["body", "bodyPreview", "uniqueBody", "toRecipients", "ccRecipients", "bccRecipients",
                     "from", "sender", "replyTo"],
    "device-pii": ["serialNumber", "imei", "meid", "phoneNumber", "userPrincipalName", "emailAddress"],
    "credentials": ["secretText", "hint", "key", "customKeyIdentifier"],
}


def app_id(n: int) -> str:
    """The client id of the ``n``-th generated workload (stable across runs)."""
    return str(uuid.uuid5(_NAMESPACE, f"workload-{n}"))


def bench_app_rule(approve: bool = False) -> RuleSpec:
    rule = RuleSpec(BENCH_RULE_ID, "mcp-directory (the benchmark's caller) reads the directory.", "allow", (
        _op(["GET"], "/users/**", "/groups/**", "/applications/**"),
    ), when={"app_ids": [BENCH_APP_ID]}, mask="directory-pii")
    if not approve:
        return rule
    return replace(rule, action="approve",
                   approval={"approvers": {"users": [BENCH_APPROVER]}, "timeout": "1m", "max_grant": "1h"})


def rule_specs(n: int, approve: bool = False) -> list[RuleSpec]:
    """``n`` rules: guardrails (a fifth of a small policy, all ten of a larger one), the token
    endpoint, the benchmark caller's rule (``approve``: an approve rule), then workloads until ``n``."""
    if n < 3:
        raise ValueError("a realistic policy has at least 3 rules")
    guardrails = list(GUARDRAILS[: max(1, min(len(GUARDRAILS), n // 5))])
    rules = [*guardrails, TOKEN_ENDPOINT, bench_app_rule(approve)]
    workload = 0
    while len(rules) < n:
        kind, templates = WORKLOADS[workload % len(WORKLOADS)]
        when = {"app_ids": [app_id(workload)]}
        if workload % 7 == 3:  # some workloads are pinned to their certificate, as hardened ones are
            when["auth_methods"] = ["certificate"]
        for suffix, description, ops, mask in templates:
            if len(rules) >= n:
                break
            rules.append(RuleSpec(f"{kind}-{workload}-{suffix}", f"{kind} #{workload} {description}.", "allow",
                                  ops, when=dict(when), mask=mask))
        workload += 1
    return rules


def _flow(values) -> str:
    return json.dumps(list(values))


def policy_yaml(n: int, approve: bool = False) -> str:
    """The YAML text of a realistic ``n``-rule policy for the look-alike tenant (``approve``: the
    benchmark caller's rule is an approve rule)."""
    out = [
        f"# A realistic {n}-rule policy for the benchmark (scripts/bench), generated by",
        f"#   python -m nhi_gateway.bench policy --rules {n}",
        "# Guardrail deny rules for every caller, the token endpoint, and a few allow rules per",
        "# workload. The benchmark's caller is mcp-directory (reads /users, masked).",
        "version: 1",
        "identity:",
        f"  tenants: [{TENANT_ID}]",
        "  bearer:",
        "    audiences: [https://graph.microsoft.com, https://graph.microsoft.com/, 00000003-0000-0000-c000-000000000000]",
        "    issuers:",
        "      - https://sts.windows.net/{tenantid}/",
        "      - https://login.microsoftonline.com/{tenantid}/v2.0",
        "  proxy:",
        "    graph_token: true",
        "    audiences: [https://graph.microsoft.com, https://graph.microsoft.com/, 00000003-0000-0000-c000-000000000000]",
        "    issuers:",
        "      - https://sts.windows.net/{tenantid}/",
        "      - https://login.microsoftonline.com/{tenantid}/v2.0",
        "  leeway_seconds: 60",
        "  client_secret_grants: flag",
        "upstreams:",
        f"  - host: {GRAPH}",
        "    token: any",
        f"  - host: {LOGIN}",
        "    token: none",
        "masking:",
        "  default_profile: directory-pii",
        "  profiles:",
    ]
    for name, fields in MASK_PROFILES.items():
        out += [f"    {name}:", f"      fields: {_flow(fields)}"]
    out.append("rules:")
    for rule in rule_specs(n, approve):
        out += [f"  - id: {rule.id}", f"    description: {json.dumps(rule.description)}", f"    action: {rule.action}"]
        if rule.when:
            parts = ", ".join(f"{k}: {json.dumps(v)}" for k, v in rule.when.items())
            out.append(f"    when: {{{parts}}}")
        out.append("    operations:")
        for op in rule.operations:
            out += [f"      - host: {op.host}", f"        methods: {_flow(op.methods)}",
                    f"        paths: {_flow(op.paths)}"]
            if op.versions:
                out.append(f"        versions: {_flow(op.versions)}")
        if rule.mask:
            out.append(f"    mask: {rule.mask}")
        if rule.approval:
            a = rule.approval
            out += ["    approval:", f"      approvers: {{users: {_flow(a['approvers']['users'])}}}",
                    f"      timeout: {a['timeout']}", f"      max_grant: {a['max_grant']}"]
    return "\n".join(out) + "\n"
