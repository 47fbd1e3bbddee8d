"""The ``nhi-gateway`` command: ``main`` (run, and the subcommands' wiring), ``policy`` (lint,
explain, replay), ``approvals`` and ``records`` (recordings and the audit trail).

May import anything in the package.
"""
