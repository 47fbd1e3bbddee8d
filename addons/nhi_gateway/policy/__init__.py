"""Policy: what an identity may do, per operation.

``operation`` canonicalises a Graph request into the operation the rules match; ``model`` holds
the policy document (rules, upstreams, trust, masking profiles, approvals), loads it from YAML
with ``file:line:column`` errors, and decides; ``decision`` is the one ``Decision`` that travels
with a flow; ``batch`` judges each request inside a ``$batch`` as if sent alone; ``objects`` judges
the object a request names by an alternate key (``appId``, a UPN, ``directoryObjects``), once
resolved through Graph.

May import: ``identity.principal`` and ``masking``. Never ``addons``, ``proxy`` or ``cli``.
"""
