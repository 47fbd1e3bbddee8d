"""The mitmproxy addons: one thin adapter per stage of the chain.

Each reads a flow, calls the domain logic (``identity``, ``policy``, ``approvals``, ``masking``,
``recording``), and writes the decision back to the flow; ``failclosed`` turns every exception
into a refusal. The order they run in is set by :mod:`nhi_gateway.proxy.gateway`.

May import the domain packages. Never ``proxy`` or ``cli``.
"""
