"""Approvals: requests held until a human decides, and the time-limited grants they give.

``store`` keeps held requests, decisions and grants (SQLite, embedded); ``approver_token`` says
which tokens prove an approver (a person's delegated token for the gateway's own API, with the
policy's scope and step-up).

May import: ``policy`` and ``identity``. Never ``addons``, ``proxy`` or ``cli``.
"""
