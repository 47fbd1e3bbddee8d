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


def with_bodies_boom(original):
    """``original`` that raises for a flow with a body: a flow that can be recorded only in part."""
    def replacement(flow, *args, **kwargs):
        if flow.request.raw_content or (flow.response is not None and flow.response.raw_content):
            raise RuntimeError(INJECTED)
        return original(flow, *args, **kwargs)

    return replacement


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
        # Recorder.response -> _record: only flows with bodies fail (recorded in part)
        "recorder-bodies": (recording_process, "flow_state", with_bodies_boom(recording_process.flow_state)),
        "approvals_api": (approvals_api.ApprovalsAPI, "_caller", async_boom),  # ApprovalsAPI.request
        "reload": (reload.PolicyReload, "check", async_boom),  # the policy watcher's poll
    }[fault]
    assert hasattr(module, name), (module, name)
    setattr(module, name, replacement)


if __name__ == "__main__":
    inject(sys.argv[1])
    from nhi_gateway.cli.main import main

    sys.exit(main(sys.argv[2:]))
