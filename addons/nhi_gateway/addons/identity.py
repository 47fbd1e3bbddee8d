"""Identity: who is calling, from the proxy credentials and/or the Authorization header.

``HTTPS_PROXY=http://<name>:<JWT>@host:port`` makes clients send ``Proxy-Authorization: Basic`` on
CONNECT only, so the identity proven there is bound to the client connection and holds for every
request inside the tunnel. ``Authorization: Bearer`` is read per request. The policy says, per
upstream, which of the two are required. ``Proxy-Authorization`` never goes upstream.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass, replace

from mitmproxy import connection, http

from nhi_gateway.policy.decision import Decision, Stage
from nhi_gateway.policy.operation import OperationError, normalize_host
from nhi_gateway.policy.loader import PolicyStore
from nhi_gateway.policy.model import Upstream
from nhi_gateway.identity.principal import Principal, TokenSource
from nhi_gateway.identity.tokens import KeysUnavailable, TokenRejected, TokenVerifier, TrustSettings, IssuerTrust
from nhi_gateway.addons.failclosed import fail_closed, refuse

logger = logging.getLogger(__name__)

PRINCIPAL_KEY = "nhi.principal"  # flow.metadata: the live Principal object (not written to disk)
SOURCE_NAMES = {TokenSource.PROXY: "the proxy credentials", TokenSource.BEARER: "Authorization: Bearer"}
CONNECT_KEY = "nhi.connect"  # flow.metadata on CONNECT flows: "admitted" once identity and host pass


IGNORED_CREDENTIAL_KEY = "nhi.ignored_credential"  # flow.metadata: credentials left aside, and why


@dataclass(frozen=True)
class Tunnel:
    """What a CONNECT established for its client connection."""

    host: str
    principal: Principal | None
    token: str | None = None  # kept in memory only, to present upstream on the caller's behalf
    ignored: str = ""  # why the CONNECT's proxy credentials were left aside (flagged on each request)


class TokenRequirement:
    """How an upstream's ``token:`` setting reads the sources a request presented."""

    @staticmethod
    def unmet(mode: str, sources: set[TokenSource]) -> str | None:
        needed = {
            "none": set(),
            "any": set(),
            "proxy": {TokenSource.PROXY},
            "bearer": {TokenSource.BEARER},
            "both": {TokenSource.PROXY, TokenSource.BEARER},
        }[mode]
        if mode == "any" and not sources:
            return "a token is required: put it in the proxy credentials or an Authorization: Bearer header"
        missing = needed - sources
        if missing:
            names = {TokenSource.PROXY: "proxy credentials (HTTPS_PROXY=http://name:<token>@...)",
                     TokenSource.BEARER: "an Authorization: Bearer header"}
            return "a token is required in " + " and ".join(names[m] for m in sorted(missing))
        return None


def proxy_token(header: str) -> str | None:
    """The JWT from ``Proxy-Authorization: Basic base64(name:<JWT>)`` (or ``Bearer <JWT>``)."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, _, password = decoded.partition(":")
    # The token is the password; some clients can only set a user name, so accept it there too.
    return password or user or None


def host_header_name(value: str | None) -> str | None:
    """The host named by a Host header or :authority, without port, normalised like request.host."""
    if not value:
        return None
    name = value.strip()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    return normalize_host(name)


def bearer_token(header: str) -> str | None:
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def trust_of(policy) -> dict[TokenSource, TrustSettings]:
    """The trust of each token source the policy names; a source it does not name accepts nothing."""
    ident = policy.identity
    out = {}
    for source in TokenSource:
        trust = ident.trust_for(source)
        if trust is not None:
            out[source] = TrustSettings(
                issuers=tuple(IssuerTrust(i.template, i.discovery_template) for i in trust.issuers),
                tenants=frozenset(t.lower() for t in ident.tenants),
                audiences=frozenset(trust.audiences),
                leeway_seconds=ident.leeway_seconds,
            )
    return out


class PolicyTrust:
    """The token trust of each source under the policy in force (``trust(source)``, None for a
    source the policy does not name), worked out once per policy: a reload replaces the policy
    object, and with it the trust."""

    def __init__(self, policies: PolicyStore) -> None:
        self.policies = policies
        self._cache: tuple[object, dict[TokenSource | None, TrustSettings]] | None = None

    def __call__(self, source: TokenSource) -> TrustSettings | None:
        return self._of_policy().get(source)

    def every_source(self) -> TrustSettings:
        """The tenants, and the issuers of every source (audiences: none), for tokens that are
        neither source's, such as approvers' (the approval API puts its own audiences in)."""
        return self._of_policy()[None]

    def _of_policy(self) -> dict:
        policy = self.policies.current
        if self._cache is None or self._cache[0] is not policy:
            trust = trust_of(policy)
            issuers = tuple(dict.fromkeys(i for s in trust.values() for i in s.issuers))
            ident = policy.identity
            trust[None] = TrustSettings(issuers=issuers, tenants=frozenset(t.lower() for t in ident.tenants),
                                        audiences=frozenset(), leeway_seconds=ident.leeway_seconds)
            self._cache = (policy, trust)
        return self._cache[1]


def verify_in(verifier: TokenVerifier, trust: PolicyTrust, token: str, source: TokenSource) -> Awaitable[Principal]:
    """Verify ``token`` against the trust of the source it was presented in."""
    settings = trust(source)
    if settings is None:
        raise TokenRejected("source", f"this gateway accepts no token in {SOURCE_NAMES[source]}: "
                                      f"the policy names no identity.{source}")
    return verifier.verify(token, source, settings)


def _identity_refusal(status: int, check: str, reason: str) -> Decision:
    code = "InvalidAuthenticationToken"
    return Decision.deny(Stage.IDENTITY, status, code, reason, check=check)


class Identity:
    def __init__(self, policies: PolicyStore, verifier: TokenVerifier) -> None:
        self.policies = policies
        self.verifier = verifier
        self._tunnels: weakref.WeakKeyDictionary[connection.Client, Tunnel] = weakref.WeakKeyDictionary()
        # CONNECTs this stage admitted that are not answered yet (flow -> its tunnel)
        self._admitting: weakref.WeakKeyDictionary[http.HTTPFlow, Tunnel] = weakref.WeakKeyDictionary()
        self._trust = PolicyTrust(policies)

    async def _principal(self, token: str, source: TokenSource, flow, status: int) -> Principal | None:
        """Verify, or refuse the flow (401/407 for a bad token, 503 when keys are unavailable)."""
        try:
            return await verify_in(self.verifier, self._trust, token, source)
        except TokenRejected as e:
            logger.info("flow %s: %s token refused (%s): %s", flow.id, source, e.check, e.message)
            refuse(flow, _identity_refusal(status, e.check, f"{source} token refused: {e.message}"))
        except KeysUnavailable as e:
            logger.error("flow %s: cannot verify tokens: %s", flow.id, e)
            refuse(flow, Decision.deny(
                Stage.IDENTITY, 503, "ServiceUnavailable",
                "the gateway cannot obtain the issuer's signing keys, so it cannot verify tokens; "
                "the request was refused (fail closed). Retry later.",
                check="keys_unavailable",
            ))
        return None

    @staticmethod
    def _host(flow) -> str | None:
        """The request's host in its canonical spelling, or a refusal. Hosts are matched by name:
        a spelling that is no host name (an IPv6 literal, which mitmproxy hands over unbracketed)
        is never an upstream of the policy."""
        try:
            return normalize_host(flow.request.host)
        except OperationError as e:
            r = flow.request
            refuse(flow, Decision.deny(
                Stage.POLICY, 403, "Authorization_RequestDenied",
                f"host {r.host[:100]!r} is not an upstream named in the policy ({e}); "
                "upstreams are matched by host name, never by address",
                check="upstream", operation=f"{r.method} {r.host[:100]}:{r.port}"))
            return None

    def _upstream(self, flow, host: str) -> Upstream | None:
        """The policy's upstream for this host, or a refusal: unknown hosts, ports other than
        443 and plain HTTP never reach the rules (a token must not travel in cleartext)."""
        r = flow.request
        where = f"{r.method} {host}:{r.port}"
        problem = None
        upstream = self.policies.current.upstream(host)
        if upstream is None:
            problem = f"host {host!r} is not an upstream named in the policy"
        elif r.method != "CONNECT" and r.scheme != "https":
            problem = f"plain HTTP to {host!r} is refused; use https"
        elif r.port != 443:
            problem = f"port {r.port} of {host!r} is not allowed; upstreams are reached on 443"
        if problem is not None:
            refuse(flow, Decision.deny(Stage.POLICY, 403, "Authorization_RequestDenied", problem,
                                       check="upstream", operation=where))
            return None
        return upstream

    async def _expired(self, header: str) -> str:
        """Why proxy credentials may be left aside at an upstream that needs no token: only an
        expired token ("" otherwise: a forged or malformed one is refused as anywhere)."""
        token = proxy_token(header)
        if token is None:
            return ""
        try:
            await verify_in(self.verifier, self._trust, token, TokenSource.PROXY)
        except TokenRejected as e:
            if e.check == "lifetime":
                return f"expired proxy credentials ignored (this upstream needs no token): {e.message}"
        except KeysUnavailable:
            pass
        return ""

    async def _proxy_principal(self, flow, header: str) -> tuple[Principal, str] | None:
        """The verified identity in a Proxy-Authorization header and its token, or a 407."""
        token = proxy_token(header)
        if token is None:
            refuse(flow, _identity_refusal(407, "format", "Proxy-Authorization carries no token"))
            return None
        principal = await self._principal(token, TokenSource.PROXY, flow, 407)
        return None if principal is None else (principal, token)

    @fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        host = self._host(flow)
        if host is None:
            return
        upstream = self._upstream(flow, host)
        if upstream is None:
            return
        principal = token = None
        ignored = ""
        header = flow.request.headers.pop("Proxy-Authorization", None)
        if header is not None and upstream.token == "none" and (ignored := await self._expired(header)):
            # The token endpoint needs no token: a client whose proxy credentials hold an expired
            # token must still reach it to renew (the SDKs renew before they reconnect). Its expired
            # credential vouches for nothing here, and each request says it was left aside.
            logger.info("flow %s: %s", flow.id, ignored)
        elif header is not None:
            verified = await self._proxy_principal(flow, header)
            if verified is None:
                return
            principal, token = verified
        elif upstream.token in ("proxy", "both"):
            refuse(flow, _identity_refusal(
                407, "missing", f"{host} requires a token in the proxy credentials "
                "(HTTPS_PROXY=http://<name>:<token>@host:port)"))
            return
        # Bound to the connection only once the CONNECT is answered 2xx (http_connected): a later
        # stage (the guard) may still refuse it, and then nothing of it may vouch for the next
        # request on that connection.
        self._admitting[flow] = Tunnel(host, principal, token, ignored)
        flow.metadata[CONNECT_KEY] = "admitted"
        if principal is not None:
            flow.metadata[PRINCIPAL_KEY] = principal

    @fail_closed
    def http_connected(self, flow: http.HTTPFlow) -> None:
        # mitmproxy calls this only for a CONNECT answered 2xx.
        tunnel = self._admitting.pop(flow, None)
        if tunnel is not None:
            self._tunnels[flow.client_conn] = tunnel
        else:
            self._tunnels.pop(flow.client_conn, None)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        self._admitting.pop(flow, None)
        self._tunnels.pop(flow.client_conn, None)

    @fail_closed
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response:
            return
        host = self._host(flow)
        if host is None:
            return
        tunnel = self._tunnels.get(flow.client_conn)
        if tunnel is not None or flow.request.scheme == "https":
            if tunnel is None or tunnel.host != host:
                # Inside a tunnel the Host header could name another service than the CONNECT did.
                refuse(flow, Decision.deny(
                    Stage.IDENTITY, 421, "MisdirectedRequest",
                    f"request for {host!r} inside a tunnel opened to "
                    f"{tunnel.host if tunnel else 'no admitted host'!r}", check="tunnel"))
                return
        # The connection goes to request.host, but a virtual-hosting upstream routes by the Host
        # header, and by the authority of an absolute-form target (RFC 9112 3.2.2), which mitmproxy
        # sends on as it came inside a tunnel: judge one name and reach another would be domain
        # fronting.
        for what, value in (("Host header", flow.request.host_header),
                            ("request target authority", flow.request.authority)):
            try:
                named = host_header_name(value)
            except OperationError:
                named = value
            if named is not None and named != host:
                refuse(flow, Decision.deny(
                    Stage.IDENTITY, 421, "MisdirectedRequest",
                    f"{what} {named[:100]!r} does not name the request's host {host!r}", check="tunnel"))
                return
        upstream = self._upstream(flow, host)
        if upstream is None:
            return

        principals: list[Principal] = []
        proxy_tokens: list[str] = []
        if tunnel is not None and tunnel.ignored:
            flow.metadata[IGNORED_CREDENTIAL_KEY] = tunnel.ignored
        if tunnel is not None and tunnel.principal is not None:
            if tunnel.principal.expires_at <= time.time():
                # The binding lives as long as the connection; the token it rests on does not.
                refuse(flow, _identity_refusal(
                    407, "lifetime", "the proxy token of this connection has expired; reconnect with a fresh one"))
                return
            # Judged again on every request (a cache hit when nothing changed): a verdict holds no
            # longer than the key that signed the token and the policy that trusted it.
            current = await self._principal(tunnel.token, TokenSource.PROXY, flow, 407)
            if current is None:
                return
            principals.append(current)
            proxy_tokens.append(tunnel.token)
        # Plain-HTTP proxy requests carry Proxy-Authorization on every request.
        proxy_header = flow.request.headers.pop("Proxy-Authorization", None)
        if proxy_header is not None:
            verified = await self._proxy_principal(flow, proxy_header)
            if verified is None:
                return
            principals.append(verified[0])
            proxy_tokens.append(verified[1])
        auth = flow.request.headers.get("Authorization")
        bearer: str | None = None  # the verified bearer token, once verified
        if auth is not None and upstream.token != "none" and auth.strip().split(" ", 1)[0].lower() != "bearer":
            # A credential of another scheme would reach the upstream unverified, riding on the
            # proxy identity's decision. (Token endpoints, token: none, keep HTTP Basic client auth.)
            refuse(flow, _identity_refusal(
                401, "scheme", "only Authorization: Bearer tokens are accepted for this upstream"))
            return
        if auth is not None and auth.strip().lower().startswith("bearer"):
            token = bearer_token(auth)
            if token is None:
                refuse(flow, _identity_refusal(401, "format", "Authorization: Bearer carries no token"))
                return
            p = await self._principal(token, TokenSource.BEARER, flow, 401)
            if p is None:
                return
            principals.append(p)
            bearer = token

        sources = {s for p in principals for s in p.token_sources}
        unmet = TokenRequirement.unmet(upstream.token, sources)
        if unmet:
            status = 407 if upstream.token == "proxy" else 401
            refuse(flow, _identity_refusal(status, "missing", f"{host}: {unmet}"))
            return
        if len({p.key for p in principals}) > 1:
            refuse(flow, _identity_refusal(
                401, "mismatch", "the proxy credentials and the Authorization header name different identities"))
            return
        proxy_trust = self.policies.current.identity.proxy
        if bearer is not None:
            # Upstream gets the token that was verified, never the header as the client wrote it.
            flow.request.headers["Authorization"] = f"Bearer {bearer}"
        elif auth is None and proxy_tokens and upstream.token != "none" and proxy_trust and proxy_trust.graph_token:
            # A client that can only set HTTPS_PROXY still needs Graph to see its token: when the
            # policy says the proxy credentials carry the Graph token itself (graph_token: true),
            # present it upstream as the bearer (redacted in every recording). A token for the
            # gateway's own API never leaves the gateway. The verifier accepted it only in the
            # compact form (identity/token_form.py), so it holds nothing a header could be split at.
            flow.request.headers["Authorization"] = f"Bearer {proxy_tokens[-1]}"
        if principals:
            merged = principals[-1].with_sources(tuple(sorted(sources)))
            if len(principals) > 1:
                # Each token stays judged on its own (authorization decides the request for every
                # one of them): a weak token next to a strong one is never averaged away.
                merged = replace(merged, presented=tuple(principals))
            flow.metadata[PRINCIPAL_KEY] = merged
