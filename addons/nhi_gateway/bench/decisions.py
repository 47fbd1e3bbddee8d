"""Decision time against policy size, in-process: the cost of ``Policy.decide`` for a policy of
5,000 rules against one of 10, over the same mix of callers and operations."""

from __future__ import annotations

import statistics
import time
import uuid
from dataclasses import dataclass

from nhi_gateway.policy.operation import Operation
from nhi_gateway.policy.loader import parse_policy
from nhi_gateway.policy.model import Policy
from nhi_gateway.identity.principal import AuthMethod, Principal, TokenSource
from nhi_gateway.bench.policies import BENCH_APP_ID, TENANT_ID, app_id, policy_yaml

# (method, target): allowed, denied by a guardrail, and matched by no rule, for the callers below.
REQUESTS = (
    ("GET", "/v1.0/users?$top=5"),
    ("GET", "/v1.0/users/0f573d36-fa84-5b0a-917c-50d218f4571b/memberOf"),
    ("GET", "/beta/groups('6f1c2d3e-0000-4000-8000-000000000001')/members"),
    ("POST", "/v1.0/applications(appId='a00780c4-4e70-52ba-ab0f-9b41ac40647f')/addPassword"),
    ("POST", "/v1.0/roleManagement/directory/roleAssignments"),
    ("GET", "/v1.0/sites/root/lists"),
    ("PATCH", "/beta/users/AdeleV@nhilab.onmicrosoft.com"),
    ("GET", "/v1.0/auditLogs/signIns?$filter=createdDateTime%20ge%202026-01-01"),
)


def callers() -> list[Principal]:
    """The benchmark's own caller, a generated workload present in every size, and an app no
    rule names (every request of it ends in the default deny)."""
    def app(aid: str, name: str) -> Principal:
        return Principal(tenant_id=TENANT_ID, object_id=str(uuid.uuid5(uuid.UUID(aid), "sp")),
                         app_id=aid, display_name=name, roles=("User.Read.All", "Group.Read.All"),
                         auth_method=AuthMethod.CERTIFICATE, token_sources=(TokenSource.BEARER,),
                         expires_at=2**31)
    return [app(BENCH_APP_ID, "mcp-directory"), app(app_id(0), "workload-0"),
            app("11111111-2222-4333-8444-555555555555", "unknown-app")]


def operations() -> list[Operation]:
    return [Operation.from_request(m, "https", "graph.microsoft.com", 443, t) for m, t in REQUESTS]


@dataclass
class DecisionTiming:
    rules: int
    load_seconds: float
    us_per_decision: float  # median of the repeats
    decisions: int

    def to_dict(self) -> dict:
        return {"rules": self.rules, "load_seconds": round(self.load_seconds, 3),
                "us_per_decision": round(self.us_per_decision, 3), "decisions": self.decisions}


def time_decisions(policy: Policy, decisions: int, repeats: int = 5) -> float:
    """Median µs per ``decide`` over ``repeats`` runs of ``decisions`` calls each."""
    pairs = [(p, op) for p in callers() for op in operations()]
    rounds = max(1, decisions // len(pairs))
    decide = policy.decide
    for p, op in pairs:  # warm: the first call of each pair builds nothing, but caches are warm
        decide(p, op)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(rounds):
            for p, op in pairs:
                decide(p, op)
        samples.append((time.perf_counter() - started) / (rounds * len(pairs)) * 1e6)
    return statistics.median(samples)


def measure(sizes: tuple[int, ...] = (10, 5000), decisions: int = 50_000) -> list[DecisionTiming]:
    out = []
    for n in sizes:
        text = policy_yaml(n)
        started = time.perf_counter()
        policy = parse_policy(text, f"<generated {n}-rule policy>")
        loaded = time.perf_counter() - started
        out.append(DecisionTiming(n, loaded, time_decisions(policy, decisions), decisions))
    return out


def agreement_check(policy: Policy) -> None:
    """The indexed decision must agree with the plain reading of the rules (what a benchmark of
    a wrong answer would be worth): raise if it does not."""
    for p in callers():
        for op in operations():
            plain = [r.id for r in policy.rules if r.matches(p, op)]
            indexed = [r.id for r in policy.matching_rules(p, op)]
            if plain != indexed:
                raise AssertionError(f"{p.display_name} {op}: index {indexed} != rules {plain}")
