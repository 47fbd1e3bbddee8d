"""Proxy: the running gateway.

``gateway`` builds mitmproxy's master with the addons in the order of the chain; ``dispatch``
sends each hook only to the addons that have it; ``egress`` is where upstream connections go
(``--resolve``).

May import anything in the package but ``cli``.
"""
