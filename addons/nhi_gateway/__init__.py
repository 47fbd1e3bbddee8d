"""nhi-gateway: a forward proxy that verifies, authorizes, masks and records what non-human
identities do with Microsoft Entra ID and Microsoft Graph.

The folders are the stages of the chain. The domain packages hold plain logic that the command-line
tools use exactly as the gateway does, and never import the packages that run the proxy:

- ``identity``: who is calling (tokens, signing keys, principal, groups, token-endpoint requests);
- ``policy``: what they may do (operations, the policy document, decisions, ``$batch``);
- ``approvals``: held requests and grants;
- ``masking``: what a response must not show;
- ``recording``: what happened (flow files, the recording process, redaction, the audit trail).

Above them: ``addons`` (one thin mitmproxy adapter per stage), ``proxy`` (the master that chains
them), ``cli`` (every subcommand); beside them ``lookalike``, ``demo`` and ``bench``.
``tests/unit/test_layout.py`` keeps the import direction.
"""

__version__ = "0.1.0"
