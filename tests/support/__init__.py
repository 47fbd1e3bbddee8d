"""Builders shared by the test modules: import them, do not write them again.

Plain functions, classes and constants; the pytest fixtures built on them are in the ``conftest.py``
files (``tests/unit/conftest.py``: ``authority``, ``tokens``, ``gw``; ``tests/e2e/conftest.py``:
``lookalike``, ``gateway``, ``tokens``), so that pytest finds them without an import.

- ``policies``: the head of a policy document (``policy_head``: version, identity, upstreams) in
  the shapes the tests use, the issuer and audience spellings, and ``op`` (the operation a
  request is judged as). A module appends its own ``masking`` and ``rules``.
- ``entra``: a stand-in for login.microsoftonline.com (``Entra``, ``entra_fetcher``) serving the
  discovery documents and keys of a look-alike ``EntraAuthority``, Entra's issuers for
  ``TrustSettings``, and the base64url and ``Basic`` encodings clients use.
- ``chain``: the gateway's addon chain without sockets (``build_gateway``), hooks run in
  mitmproxy 12's order (``exchange``), CONNECT and Graph request builders, Graph-shaped answers and
  the refusal a client reads (``refusal``).
- ``groups``: a fake Graph for the gateway's own group lookups (``FakeGraph``), its credential and
  the calling app's principal.
- ``recordings``: flows as the recorder writes them (``record``), rotated parts, reading them back.
- ``documents``: every place in a parsed policy document, and hypothesis edits of a policy's text.
- ``masking``: the model of ``redact`` on a matched JSON value (``redacted``) and its ``leaves``.
- ``e2e``: what an end-to-end test does as a client of the running gateway (``use_proxy``,
  ``marker``, ``raw_connect``) and reads back (``reached_graph``, ``recorded``, ``audit_line``,
  ``until``).
"""
