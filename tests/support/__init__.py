"""Builders shared by the test modules: import them, do not write them again.

Plain functions, classes and constants; the pytest fixtures built on them are in the ``conftest.py``
files (``tests/unit/conftest.py``: ``authority``, ``tokens``, ``gw``; ``tests/e2e/conftest.py``:
``lookalike``, ``gateway``, ``tokens``, and for approvals ``authority``, ``workload``, ``adele``,
``api``), so that pytest finds them without an import.

- ``policies``: the head of a policy document (``policy_head``: version, identity, upstreams) in
  the shapes the tests use (``SourceTrust``: a proxy source with a trust of its own), the issuer
  and audience spellings, the token endpoint's rule, and ``op`` (the operation a request is
  judged as). A module appends its own ``masking`` and ``rules``. ``EXAMPLE_POLICY`` is the
  shipped example, in ``SHIPPED_POLICIES``.
- ``entra``: a stand-in for login.microsoftonline.com (``Entra``, ``entra_fetcher``) serving the
  discovery documents and keys of a look-alike ``EntraAuthority``, Entra's issuers for
  ``TrustSettings``, and the base64url and ``Basic`` encodings clients use.
- ``chain``: the gateway's addon chain without sockets (``build_gateway``, and
  ``running_gateway`` inside ``taddons.context``; its policy ``POLICY``, whose rules are
  ``READER_RULES``), hooks run in
  mitmproxy 12's order (``exchange``), CONNECT and Graph request builders, Graph-shaped answers and
  the refusal a client reads (``refusal``).
- ``groups``: a fake Graph for the gateway's own group lookups (``FakeGraph``), its credential and
  the calling app's principal.
- ``recordings``: flows as the recorder writes them (``record``), rotated parts, reading them back.
- ``traffic``: recorded traffic as the policy tools read it back: flows with the decision each
  got (``recorded``, ``allowed``, ``denied``), written to a recording (``write_flows``), from
  mcp-directory (``MCP_PRINCIPAL``) and rotation-bot (``ROTATION_BOT``); ``policy_cli`` runs
  ``nhi-gateway policy``.
- ``documents``: every place in a parsed policy document, and hypothesis edits of a policy's text.
- ``masking``: the model of ``redact`` on a matched JSON value (``redacted``) and its ``leaves``.
- ``e2e``: what an end-to-end test does as a client of the running gateway (``use_proxy``,
  ``session_for``, ``marker``, ``raw_connect``, ``proxy_basic``) and reads back (``reached_graph``, ``recorded``,
  ``audit_line``, ``until``).
- ``wire``: requests spelled byte by byte through a running gateway: a TLS ``tunnel`` inside a
  CONNECT, raw bytes ``exchange``d through it and the answers taken apart (``statuses``,
  ``json_bodies``), one HTTP/2 stream sent with h2 (``h2_request``), and an SSL context that offers
  ``h2`` first (``client_context``).
- ``relay``: a loopback TCP relay that can be made to stall, reset or go down (``Relay``), the
  stand-in for Entra, Graph or PostgreSQL failing; a TLS upstream that misbehaves once
  connected (``MuteServer``: silent, trickling, huge or slow).
- ``approvals``: just-in-time approval through a running gateway: its policy, the workload's and
  the approvers' tokens, the approval API and CLI as an approver calls them, a held request in a
  thread of its own (``Call``, ``add_password``, ``hold``) and the audit lines of what became of it.
"""
