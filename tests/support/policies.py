"""The head of a policy document, as tests write it before their own masking profiles and rules;
and ``op``, the operation a request is judged as.

``policy_head(TENANT)`` gives::

    version: 1
    identity:
      tenants: [<TENANT>]
      bearer:
        audiences: [https://graph.microsoft.com]
        issuers: ["https://login.microsoftonline.com/{tenantid}/v2.0"]
      proxy:
        graph_token: true
        audiences: [https://graph.microsoft.com]
        issuers: ["https://login.microsoftonline.com/{tenantid}/v2.0"]
    upstreams:
      - host: graph.microsoft.com

The identity section is in the per-token-source form: both sources (``bearer``, a token the
caller sends; ``proxy``, a token in the proxy credentials, also good as the Graph token) trust
the same audiences and issuers, unless a module gives the proxy source its own ``SourceTrust``
(or None to leave it out).

``TOKEN_ENDPOINT_RULE`` lets workloads fetch their tokens through the gateway (with
``LOGIN_UPSTREAM`` among the upstreams).

Lint and loader messages name ``file:line:column``, and tests assert those positions: the head's
lines are therefore fixed (one issuer on one line, several as a block list, one line per upstream
key), so a module that switches to it keeps the line numbers it asserts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from nhi_gateway.policy.operation import Operation

SHIPPED_POLICIES = Path(__file__).resolve().parents[2] / "policies"
EXAMPLE_POLICY = SHIPPED_POLICIES / "example.yaml"

GRAPH_HOST = "graph.microsoft.com"
LOGIN_HOST = "login.microsoftonline.com"

# The two issuer forms Entra signs with: v1.0 tokens (sts.windows.net) and v2.0 tokens.
V1_ISSUER = "https://sts.windows.net/{tenantid}/"
V2_ISSUER = "https://login.microsoftonline.com/{tenantid}/v2.0"

GRAPH_AUDIENCE = "https://graph.microsoft.com"
# Every spelling of Graph's audience a real Entra token carries (v1, v2 with a slash, the app id).
ALL_GRAPH_AUDIENCES = (GRAPH_AUDIENCE, "https://graph.microsoft.com/", "00000003-0000-0000-c000-000000000000")

# The token endpoint as an upstream: the gateway lets it through without a bearer token.
LOGIN_UPSTREAM = {"host": LOGIN_HOST, "token": "none"}

# A workload asks for its token through the gateway, before it has one.
TOKEN_ENDPOINT_RULE = """\
  - id: token-endpoint
    action: allow
    when: {anonymous: true}
    operations:
      - host: login.microsoftonline.com
        methods: [POST]
        paths: ["/{tenant}/oauth2/v2.0/token"]
"""


class SourceTrust(NamedTuple):
    """What one token source of the identity section trusts."""

    audiences: Iterable[str] = (GRAPH_AUDIENCE,)
    issuers: Iterable[str] = (V2_ISSUER,)
    graph_token: bool = False  # the proxy source's token is also the Graph token presented upstream


_HEAD_TRUST = SourceTrust((), ())  # stands for the head's own audiences and issuers


def _source(name: str, trust: SourceTrust) -> list[str]:
    issuers = list(trust.issuers)
    lines = [f"  {name}:"] + (["    graph_token: true"] if trust.graph_token else [])
    lines.append(f"    audiences: [{', '.join(trust.audiences)}]")
    if len(issuers) == 1:
        lines.append(f'    issuers: ["{issuers[0]}"]')
    else:
        lines += ["    issuers:", *(f"      - {issuer}" for issuer in issuers)]
    return lines


def policy_head(*tenants: str, issuers: Iterable[str] = (V2_ISSUER,),
                audiences: Iterable[str] = (GRAPH_AUDIENCE,),
                upstreams: Iterable[str | Mapping[str, str]] = (GRAPH_HOST,),
                proxy: SourceTrust | None = _HEAD_TRUST,
                **identity: str) -> str:
    """``version``, ``identity`` and ``upstreams`` of a policy, ending with a newline.

    ``identity`` adds keys to the identity section after the ``proxy`` source
    (``client_secret_grants="deny"``); ``audiences`` and ``issuers`` are those of both sources
    (the proxy source's token also the Graph token) unless ``proxy`` gives that source a trust of
    its own, or None to leave it out; an upstream is a host or a mapping with ``host`` first
    (``{"host": GRAPH_HOST, "token": "any"}``).
    """
    head = SourceTrust(tuple(audiences), tuple(issuers))
    lines = ["version: 1", "identity:", f"  tenants: [{', '.join(tenants)}]", *_source("bearer", head)]
    if proxy is not None:
        lines += _source("proxy", head._replace(graph_token=True) if proxy is _HEAD_TRUST else proxy)
    lines += [f"  {key}: {value}" for key, value in identity.items()]
    lines.append("upstreams:")
    for upstream in upstreams:
        fields = {"host": upstream} if isinstance(upstream, str) else dict(upstream)
        first, *rest = fields.items()
        lines.append(f"  - {first[0]}: {first[1]}")
        lines += [f"    {key}: {value}" for key, value in rest]
    return "\n".join(lines) + "\n"


def op(method: str, target: str, host: str = GRAPH_HOST) -> Operation:
    """The operation of an HTTPS request for ``target`` on ``host``, as the gateway reads it."""
    return Operation.from_request(method, "https", host, 443, target)
