"""Starting the gateway: a mitmproxy master that this project builds itself.

The gateway's addons are top-level addons of this master (never ``-s`` scripts, which mitmproxy
hot-reloads and unloads on error, leaving the proxy forwarding unfiltered). The master carries
only the built-in addons a forward proxy needs, so no debugging feature (map-remote, replay,
scripts, proxyauth storing passwords in flow metadata) sits on the data path.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import hooks, master, options
from mitmproxy.connection import ConnectionState
from mitmproxy.proxy import events as proxy_events
from mitmproxy.proxy import server as proxy_server
from mitmproxy.addons import core, disable_h2c, dns_resolver, errorcheck, next_layer, proxyserver, tlsconfig

from nhi_gateway.addons.admin import Admin, gateway_checks
from nhi_gateway.addons.admin_tls import AdminTLS, AdminTLSError, server_context
from nhi_gateway.addons.admission import Admission
from nhi_gateway.addons.approval import Approval
from nhi_gateway.addons.approvals_api import ApprovalsAPI, api_mode, is_api_target
from nhi_gateway.addons.audit import Audit
from nhi_gateway.addons.authorization import Authorization
from nhi_gateway.addons.flowlog import FlowLog
from nhi_gateway.addons.guard import Guard, Health
from nhi_gateway.addons.identity import Identity, trust_of
from nhi_gateway.addons.masking import Masking
from nhi_gateway.addons.membership import Membership
from nhi_gateway.addons.metrics import GatewayMetrics, Metrics, state_metrics
from nhi_gateway.addons.objects import ObjectNames
from nhi_gateway.addons.recorder import Recorder, WriteAhead
from nhi_gateway.addons.stopping import DEFAULT_DRAIN_TIMEOUT, Stopping
from nhi_gateway.addons.reload import PolicyReload
from nhi_gateway.addons.routing import Routing
from nhi_gateway.addons.upstream_timeout import DEFAULT_UPSTREAM_TIMEOUT, UpstreamTimeout
from nhi_gateway.approvals.store import Approvals, ApprovalStore, ApprovalStoreError
from nhi_gateway.approvals.postgres import PostgresApprovalStore
from nhi_gateway.approvals.state import StateBackend, sqlite_path
from nhi_gateway.recording.audit import AuditCopy, AuditLog
from nhi_gateway.proxy.dispatch import HOOK_CPU_ENV, HookClock, IndexedAddonManager
from nhi_gateway.proxy.egress import Address, EgressClient
from nhi_gateway.proxy.protocol_errors import answer_protocol_errors_as_graph, tell_when_clients_leave_a_held_request
from nhi_gateway.identity.groups import DEFAULT_TTL, GraphCredential, GroupResolver
from nhi_gateway.policy.loader import PolicyStore, load_policy
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.objects import ObjectResolver
from nhi_gateway.recording.files import DEFAULT_FSYNC_INTERVAL, DEFAULT_MAX_BYTES
from nhi_gateway.identity.signing_keys import DEFAULT_UNKNOWN_KID_INTERVAL, KeyStore
from nhi_gateway.identity.tokens import TokenVerifier

logger = logging.getLogger(__name__)

GC_YOUNG_THRESHOLD = 5_000  # allocations between young collections (Python's default: 700); larger ones pause long enough to show in p99
BODY_SIZE_LIMIT = "32m"  # larger bodies fail closed (502) instead of being streamed past masking


@dataclass
class GatewayConfig:
    policy_path: Path
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    confdir: Path = field(default_factory=lambda: Path.home() / ".nhi-gateway")
    recordings: Path = Path("recordings")
    audit_path: Path | None = None  # default: <recordings>/audit.jsonl
    resolve: dict[str, Address] = field(default_factory=dict)
    upstream_ca: Path | None = None  # trust for upstream TLS and key fetches (default: certifi)
    ready_file: Path | None = None
    # The gateway's own Graph credential, for group membership (None: rules on groups fail closed).
    graph_credential: GraphCredential | None = None
    groups_ttl: int = DEFAULT_TTL
    recordings_max_bytes: int = DEFAULT_MAX_BYTES  # a file that would grow past this starts a .N.mitm
    recordings_hourly: bool = False  # one file per app and hour instead of per app and day
    recordings_fsync: float = DEFAULT_FSYNC_INTERVAL  # seconds between fsyncs of a file (0: every flow)
    # Approvals: requests and grants (default <recordings>/approvals.sqlite3), and where the
    # approval API listens (default: 127.0.0.1, the proxy's port + 1, or a free port with port 0).
    approvals_db: Path | None = None
    # --state: None or sqlite:///PATH keeps the SQLite file above; postgresql://... shares
    # approvals and grants with every replica that names the same database.
    state: StateBackend | None = None
    approvals_listen: tuple[str, int] | None = None
    upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT  # seconds an upstream has to answer (else 502)
    # At most one refetch of an issuer's keys per this many seconds for tokens with an unknown kid.
    unknown_kid_refresh: float = DEFAULT_UNKNOWN_KID_INTERVAL
    # Recordings are written by a child process (nhi_gateway.recording.process), off the event
    # loop; False writes them in the gateway's own process (tests that reach into the recorder).
    recording_process: bool = True
    # SIGTERM: how long requests in flight may take to finish before the gateway stops anyway.
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    own_log_handler: bool = False  # True: logging is set up already (proxy.logs), not by mitmproxy
    # TLS on the admin listener with the operator's certificate; a non-loopback admin address
    # without it is refused unless admin_insecure.
    admin_tls_cert: Path | None = None
    admin_tls_key: Path | None = None
    admin_insecure: bool = False
    audit_copies: tuple[str, ...] = ()  # also send each audit line to: stdout, syslog[:ADDRESS]
    # run --workers N: this process's number (1..N). Its recordings, write-ahead log and audit
    # trail are files of its own (".w2"), and each audit line and recorded flow names it.
    worker: int | None = None


@dataclass
class Gateway:
    """The running pieces, for the CLI and for tests that need to look inside."""

    config: GatewayConfig
    master: master.Master
    policies: PolicyStore
    verifier: TokenVerifier
    egress: EgressClient
    recorder: Recorder
    health: Health
    approvals: Approvals | None = None

    @property
    def address(self) -> tuple[str, int]:
        addrs = self.master.addons.get("proxyserver").listen_addrs()
        return addrs[0][:2]

    @property
    def approvals_api(self) -> str:
        """``http://host:port`` of the approval API, once it listens ("" before)."""
        for server in self.master.addons.get("proxyserver").servers:
            if is_api_target(server.mode) and server.listen_addrs:
                host, port = server.listen_addrs[0][:2]
                return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return ""

    @property
    def ca_cert(self) -> Path:
        return self.config.confdir / "mitmproxy-ca-cert.pem"


def build_chain(config: GatewayConfig, policies: PolicyStore, verifier: TokenVerifier, health: Health,
                groups: GroupResolver | None = None, egress: EgressClient | None = None):
    """The gateway's addons, in the order mitmproxy calls them for each event."""
    audit_path = audit_path_of(config)
    audit_log = AuditLog(audit_path, fsync_interval=config.recordings_fsync)
    audit_log.copies = [AuditCopy(target) for target in config.audit_copies]
    audit = Audit(audit_log, health, worker=config.worker)
    approvals = open_approvals(config)
    notify = None
    if egress is not None:
        async def notify(url: str, payload: dict):  # the gateway's own client: never through the proxy
            return await egress.post_json(url, json_body=payload)
    recorder = Recorder(config.recordings, health, on_refusal=audit.amend,
                        max_bytes=config.recordings_max_bytes, hourly=config.recordings_hourly,
                        fsync_interval=config.recordings_fsync, separate_process=config.recording_process,
                        worker=config.worker)
    stopping = Stopping()
    approval = Approval(policies, approvals, health, audit.log, notify)
    metrics = GatewayMetrics()
    recorder.on_write = metrics.recorded
    audit.on_write = metrics.audited
    metrics.watch(state_metrics(approval, approvals, verifier.keys, groups))

    def trusted_issuers():
        # Every issuer of every token source, once (a source left out of the policy has none).
        by_source = trust_of(policies.current).values()
        tenants = sorted({t for trust in by_source for t in trust.tenants})
        issuers = dict.fromkeys(i for trust in by_source for i in trust.issuers)
        return [(i.metadata_for(tenant), i.issuer_for(tenant)) for tenant in tenants for i in issuers]

    admin = Admin(metrics, gateway_checks(policies, verifier.keys, trusted_issuers, recorder, health, approvals,
                                          stopping), require_tls=config.admin_tls_cert is not None,
                  off_loop=approvals.off_loop)
    chain = [
        stopping,  # first: once the gateway stops, new requests are refused (503) before any work
        PolicyReload(policies),  # no flow hooks: polls the policy file, keeps the last good one
        admin,  # /healthz, /readyz, /metrics on the admin listener: never audited or recorded
        # First of the flow stages: answers every request on the approval API's own listener.
        ApprovalsAPI(policies, approvals, verifier, health, audit.log, groups, judged_now=approval.judged_now),
        Routing(config.resolve),
        # Before identity and every rule: a request of a shape the gateway will not judge (method
        # overrides, oversized target or headers, transfer codings) is refused as it came.
        Admission(),
        Identity(policies, verifier),
        Membership(policies, groups),  # after identity: replaces the principal with its groups
        # After membership (rules' `when` may name groups): resolves alternate keys of objects.
        ObjectNames(policies, ObjectResolver(groups, ttl=config.groups_ttl) if groups is not None else None),
        Authorization(policies),
        approval,  # holds `approve` decisions
        Masking(policies),
        Guard(health),  # last of the deciding stages: nothing without an explicit allow passes
        WriteAhead(recorder),  # an allowed request goes upstream only once it is on record
        UpstreamTimeout(config.upstream_timeout),  # times what goes upstream: 502 instead of a hang
        audit,
        recorder,  # after audit and guard: the recording shows what the client saw
        Metrics(metrics, rule_ids_of(policies)),  # counts each flow once its answer is final
        FlowLog(),  # one line per flow: who, what, the verdict
        stopping.settled,  # last: a flow is done once audited and handed to the recording
    ]
    return chain, recorder


def audit_path_of(config: GatewayConfig) -> Path:
    """The audit trail of this process: one chain per writer, so each worker has its own file."""
    path = config.audit_path or config.recordings / "audit.jsonl"
    return path.with_name(f"{path.stem}.w{config.worker}{path.suffix}") if config.worker else path


def rule_ids_of(policies: PolicyStore):
    """The rule ids of the policy in force, worked out once per policy (metrics' rule labels)."""
    seen: list = [None, frozenset()]

    def rule_ids() -> frozenset[str]:
        if seen[0] is not policies.current:
            seen[:] = [policies.current, frozenset(r.id for r in policies.current.rules)]
        return seen[1]

    return rule_ids


def open_approvals(config: GatewayConfig) -> Approvals:
    if config.state is not None and config.state.shared:
        # The server need not be up: until it is, what needs approval or a grant is refused 503.
        shared = PostgresApprovalStore(config.state.location, host=socket.gethostname())
        shared.start()
        logger.info("approvals and grants in %s (replica %s)", shared.path, shared.replica_id)
        return Approvals(shared)
    store = ApprovalStore(sqlite_path(config.state, config.approvals_db or config.recordings / "approvals.sqlite3"))
    if config.worker and config.worker > 1:
        return Approvals(store)  # worker 1 cleans up after the last run; the others must not cancel its requests
    try:
        stale = store.cancel_pending("the gateway restarted while the request was held", time.time())
    except ApprovalStoreError as e:  # requests that need approval are refused until it works
        logger.error("%s", e)
        stale = 0
    if stale:
        logger.warning("%d approval requests were still pending from the last run: marked cancelled", stale)
    return Approvals(store)


def approvals_listen(config: GatewayConfig) -> tuple[str, int]:
    """Where the approval API listens: loopback by default, whatever the proxy listens on, at the
    proxy's port + 1. mitmproxy refuses two listeners on one (host, 0), so a free port is picked
    here when the API's port is 0."""
    host, port = config.approvals_listen or ("127.0.0.1", config.listen_port + 1 if config.listen_port else 0)
    if port == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    return host, port


def answer_lost_connection_attempts() -> None:
    """Work around a mitmproxy 12.3 race: an upstream that resets the connection between
    ``connect()`` and ``getpeername()`` fails ``assert command.connection.peername`` in
    ``ConnectionHandler.open_connection``. The task dies without telling the layer that waits
    for the connection, so the request hangs until ``tcp_timeout``, and when the client gives up
    the flow is never audited or recorded (its events queue behind the layer that waits). The
    attempt is answered here as the failed connection it is: the client gets 502 and the flow
    its ``error`` hook."""
    original = proxy_server.ConnectionHandler.open_connection
    if getattr(original, "nhi_answers_lost_attempts", False):
        return

    async def open_connection(self, command):
        try:
            await original(self, command)
        except AssertionError:
            conn = command.connection
            if conn.peername is not None or self.transports.get(conn) is None:
                raise
            io = self.transports.pop(conn)
            if io.writer is not None:
                io.writer.close()
            conn.state = ConnectionState.CLOSED
            conn.error = "the upstream reset the connection as it was opened"
            await self.server_event(proxy_events.OpenConnectionCompleted(command, conn.error))

    open_connection.nhi_answers_lost_attempts = True
    proxy_server.ConnectionHandler.open_connection = open_connection


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host if ":" in host else socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


async def start(config: GatewayConfig) -> Gateway:
    """Build and configure the master inside the running loop; servers start with ``run``."""
    answer_lost_connection_attempts()
    answer_protocol_errors_as_graph()
    policies = PolicyStore(load_policy(config.policy_path))
    if notice := policies.current.report_notice():
        logger.warning("%s: %s", config.policy_path, notice)
    config.confdir.mkdir(parents=True, exist_ok=True)
    config.recordings.mkdir(parents=True, exist_ok=True)
    opts = options.Options(
        listen_host=config.listen_host,
        listen_port=config.listen_port,
        confdir=str(config.confdir),
    )
    # With its own log handler (nhi_gateway.proxy.logs, set up by `run`), mitmproxy's is not added.
    m = master.Master(opts, with_termlog=not config.own_log_handler)
    # mitmproxy turns every log record into a deprecated ``add_log`` event as well: formatted once
    # more and handed to the loop through its self-pipe, about as dear as the line itself. No addon
    # of the gateway's chain, nor mitmproxy's own since version 9, listens to it.
    legacy = getattr(m, "_legacy_log_events", None)
    if legacy is not None:
        legacy.uninstall()
    # Each event only to the addons that have its hook; with NHI_HOOK_CPU=<file> (the benchmark's
    # --hooks), the CPU of each hook is counted and written there.
    hook_cpu = os.environ.get(HOOK_CPU_ENV)
    IndexedAddonManager.install(m, HookClock(Path(hook_cpu)) if hook_cpu else None)
    builtin = [
        core.Core(),
        disable_h2c.DisableH2C(),
        proxyserver.Proxyserver(),
        dns_resolver.DnsResolver(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        errorcheck.ErrorCheck(),
    ]
    if config.admin_tls_cert is not None:
        # Before mitmproxy's TLS addon: it leaves a connection whose TLS context is set alone.
        builtin.insert(builtin.index(next(a for a in builtin if isinstance(a, tlsconfig.TlsConfig))),
                       AdminTLS(server_context(config.admin_tls_cert, config.admin_tls_key)))
    m.addons.add(*builtin)
    health = Health()
    egress = EgressClient(config.resolve, str(config.upstream_ca) if config.upstream_ca else None)
    verifier = TokenVerifier(KeyStore(egress.get_json, unknown_kid_interval=config.unknown_kid_refresh))
    groups = None
    if config.graph_credential is not None:
        groups = GroupResolver(config.graph_credential, egress, ttl=config.groups_ttl)
        logger.info("group membership is resolved through Graph as %r", groups)
    chain, recorder = build_chain(config, policies, verifier, health, groups, egress)
    m.addons.add(*chain)
    approval = next(a for a in chain if isinstance(a, Approval))
    tell_when_clients_leave_a_held_request(approval.request_cancelled)
    api_host, api_port = approvals_listen(config)
    if config.admin_tls_cert is None and not _is_loopback(api_host):
        if not config.admin_insecure:
            raise AdminTLSError(
                f"--approvals-listen {api_host} is not a loopback address, and approvers' tokens would cross the "
                "network in clear: give --admin-tls-cert and --admin-tls-key (or --admin-insecure, behind a "
                "TLS-terminating proxy you trust)")
        logger.warning("the admin listener on %s speaks plain HTTP (--admin-insecure)", api_host)
    section = policies.current.approvals
    if any(r.action is Action.APPROVE for r in policies.current.rules) and not (section and section.client_id):
        logger.warning("the policy holds requests for approval but names no app registration for the approval "
                       "API (approvals.client_id): no token can approve them, so they time out")
    opts.update(
        mode=["regular", api_mode(api_host, api_port)],
        # lazy: no upstream connection is opened at CONNECT, before the request is judged.
        connection_strategy="lazy",
        body_size_limit=BODY_SIZE_LIMIT,
        stream_large_bodies=None,
        rawtcp=False,
        websocket=False,  # upgrades are refused at the request (guard); never relay messages unjudged
        ssl_insecure=False,
        **({"ssl_verify_upstream_trusted_ca": str(config.upstream_ca)} if config.upstream_ca else {}),
    )
    # Addons added from code get no initial configure call; give ours one so no state is missing.
    for addon in chain:
        m.addons.invoke_addon_sync(addon, hooks.ConfigureHook(set(opts.keys())))
    gateway = Gateway(config, m, policies, verifier, egress, recorder, health, approval.approvals)
    approval.api_url = lambda: gateway.approvals_api
    if recorder.process is not None:
        # Before the listener opens: mitmproxy's `running` hooks run once clients are already
        # served, and an error logged meanwhile ends the proxy (its errorcheck addon).
        await recorder.start_process()
    return gateway


def client_environment(gateway: Gateway) -> list[str]:
    host, port = gateway.address
    ca = gateway.ca_cert
    return [
        f"export HTTPS_PROXY=http://<name>:<access-token>@{host}:{port}   # token as proxy credentials",
        f"#   or: export HTTPS_PROXY=http://{host}:{port}   # token in Authorization: Bearer",
        f"export SSL_CERT_FILE={ca}",
        f"export REQUESTS_CA_BUNDLE={ca}",
        f"export NODE_EXTRA_CA_CERTS={ca}",
        f"# curl: curl --proxy http://{host}:{port} --cacert {ca} ...",
    ]


def announce(gateway: Gateway, out=sys.stdout) -> None:
    host, port = gateway.address
    lines = [
        f"nhi-gateway listening on {host}:{port} (policy {gateway.config.policy_path})",
        f"CA certificate clients must trust: {gateway.ca_cert}",
        f"Recordings: {gateway.config.recordings}",
        f"Approval API: {gateway.approvals_api}   (nhi-gateway approvals list --api {gateway.approvals_api})",
        "Client environment:",
        *("  " + line for line in client_environment(gateway)),
    ]
    if gateway.config.worker in (None, 1):  # the workers of --workers N: the first one speaks for all
        print("\n".join(lines), file=out, flush=True)
    if gateway.config.ready_file:
        ready = {"host": host, "port": port, "ca_cert": str(gateway.ca_cert), "pid": os.getpid(),
                 "approvals_api": gateway.approvals_api}
        tmp = gateway.config.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(gateway.config.ready_file)


def settle_garbage_collector() -> None:
    """Once started: move everything alive now (modules, policy, keys) out of the collector's
    sight, and collect the young generation less often. Requests free what they allocate by
    reference counting; with the defaults the collector ran every few requests and re-walked the
    whole start-up heap at each full collection, a measurable share of each request's time."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)  # older generations as often as before, relative to the young


async def drain(gateway: Gateway, why: str) -> None:
    """Stop as an orchestrator expects on SIGTERM: close the listeners, refuse new requests on open
    connections (503), answer held approval requests 503, let the requests in flight finish
    within ``drain_timeout``, then stop (the recording process writes what it was handed)."""
    try:
        reason = f"the gateway is stopping ({why})"
        chain = gateway.master.addons
        stopping = chain.get("stopping")
        stopping.begin(reason)
        held = chain.get("approval").stop(reason)
        try:
            await chain.get("proxyserver").servers.update([])
        except Exception as e:  # noqa: BLE001 - stopping must go on
            logger.error("closing the listeners failed: %r", e)
        grace = gateway.config.drain_timeout
        logger.warning("%s: listeners closed, %d held approval requests answered 503, waiting up to %gs "
                       "for %d requests in flight", reason, held, grace, len(stopping.in_flight))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while stopping.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if stopping.in_flight:
            logger.error("%d requests were still in flight after %gs; stopping anyway", len(stopping.in_flight), grace)
    finally:  # whatever went wrong above, the gateway stops
        gateway.master.shutdown()


def handle_signals(gateway: Gateway) -> None:
    """SIGTERM and SIGINT drain (a second one stops at once); SIGHUP reloads the policy, keeping
    the last good one when the file is bad."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def stop(name: str) -> None:
        if any(t.get_name() == "nhi-drain" for t in tasks):
            logger.warning("%s again: stopping now", name)
            gateway.master.shutdown()
            return
        logger.warning("%s: draining", name)
        task = loop.create_task(drain(gateway, name), name="nhi-drain")
        tasks.add(task)

    def reload() -> None:
        logger.warning("SIGHUP: reloading the policy from %s", gateway.policies.path)
        task = loop.create_task(gateway.master.addons.get("policyreload").check(force=True), name="nhi-sighup")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGTERM, stop, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, stop, "SIGINT")
    loop.add_signal_handler(signal.SIGHUP, reload)


async def serve(config: GatewayConfig) -> None:
    gateway = await start(config)
    handle_signals(gateway)
    run = asyncio.create_task(gateway.master.run())
    # Announce only once the listener is bound, so the printed port is the real one.
    while not run.done():
        ps = gateway.master.addons.get("proxyserver")
        if ps.listen_addrs():
            break
        await asyncio.sleep(0.02)
    api_failed = not run.done() and not gateway.approvals_api
    if api_failed:
        # Without its API nobody could answer an approval: held requests would only time out.
        gateway.master.shutdown()
    elif not run.done() and gateway.ca_cert.exists():
        settle_garbage_collector()
        announce(gateway)
    try:
        await run
    finally:
        await gateway.egress.aclose()
        if gateway.approvals is not None:
            await gateway.approvals.aclose()
    if api_failed:
        raise OSError(f"the approval API could not listen ({gateway.master.options.mode[-1]}); "
                      "choose another address with --approvals-listen")
