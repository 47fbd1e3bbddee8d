"""Loopback look-alikes of Microsoft Entra ID and Microsoft Graph, for tests and the demo.

No network exists where the gateway is tested, so these stand in for the real services: the same
names (served with a certificate from a local test CA), the same token shapes (including Graph's
nonce quirk), the same JSON shapes and error codes. Start one with
``python -m nhi_gateway.lookalike --state-dir DIR``; it writes ``DIR/lookalike.json`` when ready.
"""

from nhi_gateway.lookalike.directory import FOREIGN_TENANT_ID, MCP_DIRECTORY, NHI_GATEWAY, ROTATION_BOT, TENANT_ID, Directory
from nhi_gateway.lookalike.minting import (
    GRAPH_APP_ID,
    GRAPH_AUDIENCES,
    GRAPH_RESOURCE,
    EntraAuthority,
    graph_nonce_hash,
    mint_client_assertion,
    undo_graph_nonce,
)
from nhi_gateway.lookalike.pki import SigningKey, ensure_server_pki

__all__ = [
    "FOREIGN_TENANT_ID",
    "GRAPH_APP_ID",
    "GRAPH_AUDIENCES",
    "GRAPH_RESOURCE",
    "MCP_DIRECTORY",
    "NHI_GATEWAY",
    "ROTATION_BOT",
    "TENANT_ID",
    "Directory",
    "EntraAuthority",
    "SigningKey",
    "ensure_server_pki",
    "graph_nonce_hash",
    "mint_client_assertion",
    "undo_graph_nonce",
]
