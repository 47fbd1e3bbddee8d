"""nhi-gateway: a forward proxy that verifies, authorizes, masks and records what non-human
identities do with Microsoft Entra ID and Microsoft Graph.

The domain logic (tokens, policy, operations, masking, audit) lives in plain modules of this
package with no mitmproxy import; ``nhi_gateway.addons`` holds the thin mitmproxy adapters.
"""

__version__ = "0.1.0"
