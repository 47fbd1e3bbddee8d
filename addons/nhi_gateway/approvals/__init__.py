"""Approvals: requests held until a human decides, and the time-limited grants they give.

``store`` keeps held requests, decisions and grants (SQLite, embedded).

May import: ``policy`` and ``identity``. Never ``addons``, ``proxy`` or ``cli``.
"""
