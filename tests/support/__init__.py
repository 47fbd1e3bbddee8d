"""Builders shared by the test modules: import them, do not write them again.

- ``policies``: the head of a policy document (``version``, ``identity``, ``upstreams``) in the
  shapes the tests use; a module appends its own ``masking`` and ``rules``.
- ``entra``: a stand-in for login.microsoftonline.com that serves discovery and signing keys from a
  look-alike ``EntraAuthority``, and the ``Basic``/base64url encodings clients use.
- ``chain``: the addon chain built as the gateway builds it, with mitmproxy 12's hook order, flow
  builders for CONNECTs and Graph requests, Graph-shaped answers and the refusal a client reads.
  Its fixtures (``authority``, ``tokens``, ``gw``) live in ``tests/unit/conftest.py``.
- ``e2e``: what a client of a running gateway does (``use_proxy``, a request ``marker``), and what a
  test reads back from the gateway and the look-alike Graph (``reached_graph``, ``recorded``,
  ``audit_line``, ``until``). The gateway process itself is started by ``tests/e2e/conftest.py``.
- ``schema``: walking a parsed document (every path to a leaf).

Plain functions and constants only; pytest fixtures are in the ``conftest.py`` files so that pytest
finds them without an import.
"""
