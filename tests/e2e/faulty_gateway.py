"""Run the real gateway with one fault injected into one addon: ``python faulty_gateway.py FAULT
run --policy ...``. Test-only: the gateway has no fault-injection path of its own, so this wrapper
replaces one function an addon's hook calls with one that raises, then hands over to
``nhi_gateway.cli.main.main`` exactly as ``nhi-gateway`` does.

Each fault breaks the hook from the inside (what the hook calls), not the hook itself: the hooks
are wrapped by ``fail_closed``, and that wrapping is what is under test.
"""

from __future__ import annotations

import sys

INJECTED = "injected fault"


def boom(*args, **kwargs):
    raise RuntimeError(INJECTED)


async def async_boom(*args, **kwargs):
    raise RuntimeError(INJECTED)


def inject(fault: str) -> None:
    from nhi_gateway.addons import (
        approval,
        approvals_api,
        audit,
        authorization,
        guard,
        identity,
        masking,
        membership,
        recorder,
        reload,
    )
    from nhi_gateway.recording import process as recording_process

    module, name, replacement = {
        "identity": (identity, "host_header_name", boom),  # Identity.request
        "membership": (membership, "needs_lookup", boom),  # Membership.request
        "authorization": (authorization, "operation_of", boom),  # Authorization.request
        "approval": (approval, "decision_of", boom),  # Approval.request
        "guard": (guard, "decision_of", boom),  # Guard.request (and Guard.response)
        "masking": (masking, "decision_of", boom),  # Masking.response
        "audit": (audit, "audit_record", boom),  # Audit.response
        "recorder": (recording_process, "flow_state", boom),  # Recorder.response -> _record
        "approvals_api": (approvals_api.ApprovalsAPI, "_caller", async_boom),  # ApprovalsAPI.request
        "reload": (reload.PolicyReload, "check", async_boom),  # the policy watcher's poll
    }[fault]
    assert hasattr(module, name), (module, name)
    setattr(module, name, replacement)


if __name__ == "__main__":
    inject(sys.argv[1])
    from nhi_gateway.cli.main import main

    sys.exit(main(sys.argv[2:]))
