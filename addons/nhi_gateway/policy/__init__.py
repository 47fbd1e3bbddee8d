"""Policy: what an identity may do, per operation.

``operation`` canonicalises a Graph request into the operation the rules match; ``model`` holds
the policy (rules, upstreams, trust, masking profiles, approvals) and decides; ``shape`` says once
what a policy file may hold (the models that validate it and generate its JSON Schema);
``document`` reads the YAML with positions and ``loader`` turns it into a policy with
``file:line:column`` errors; ``lint`` warns about rules that never decide; ``decision`` is the one
``Decision`` that travels with a flow; ``batch`` judges each request inside a ``$batch`` as if
sent alone; ``objects`` judges the object a request names by an alternate key (``appId``, a UPN,
``directoryObjects``), once resolved through Graph.

May import: ``identity.principal`` and ``masking``. Never ``addons``, ``proxy`` or ``cli``.
"""
