"""TLS on the admin listener (approval API, health, metrics) with the operator's certificate.

Approvers' tokens cross the network to this listener, so off loopback it must speak TLS: the
gateway refuses to start on a non-loopback admin address without ``--admin-tls-cert`` and
``--admin-tls-key`` unless told ``--admin-insecure``. The certificate is the operator's (issued
for the name approvers use), not one minted by the gateway's interception CA: this addon hands
mitmproxy the TLS context for connections on the admin listener before its own TLS addon would
make one up (``tls_start_client`` with ``ssl_conn`` already set is left alone). Once TLS is
configured, a plain-HTTP request on the admin listener is refused (``plain_http_refusal``).
"""

from __future__ import annotations

from pathlib import Path

from mitmproxy import tls
from OpenSSL import SSL

from nhi_gateway.addons.approvals_api import is_api_target
from nhi_gateway.policy.decision import Decision, Stage


class AdminTLSError(ValueError):
    """The certificate or key cannot serve: said with the option and the path."""


def server_context(cert_file: Path, key_file: Path) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    try:
        context.use_certificate_chain_file(str(cert_file))
    except (SSL.Error, OSError) as e:
        raise AdminTLSError(f"--admin-tls-cert {cert_file}: not a readable PEM certificate ({_why(e)})") from None
    try:
        context.use_privatekey_file(str(key_file))
    except (SSL.Error, OSError) as e:
        raise AdminTLSError(f"--admin-tls-key {key_file}: not a readable PEM private key ({_why(e)})") from None
    try:
        context.check_privatekey()
    except SSL.Error:
        raise AdminTLSError(f"--admin-tls-key {key_file} is not the key of --admin-tls-cert {cert_file}") from None
    # HTTP/1.1 only: the admin API needs nothing more, and mitmproxy reads it as it reads any request.
    context.set_alpn_select_callback(lambda conn, offered: b"http/1.1" if b"http/1.1" in offered
                                     else SSL.NO_OVERLAPPING_PROTOCOLS)
    return context


def _why(e: Exception) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return "; ".join(str(part[2]) for part in (e.args[0] if e.args and isinstance(e.args[0], list) else []))[:200] \
        or type(e).__name__


def plain_http_refusal() -> Decision:
    return Decision.deny(Stage.GUARD, 403, "Authorization_RequestDenied",
                         "the admin listener requires TLS (https://): tokens must not cross the network in clear",
                         check="admin_tls")


class AdminTLS:
    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        if tls_start.ssl_conn is not None or not is_api_target(getattr(tls_start.conn, "proxy_mode", None)):
            return
        tls_start.ssl_conn = SSL.Connection(self.context)
        tls_start.ssl_conn.set_accept_state()
