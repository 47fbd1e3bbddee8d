"""The decision every stage reads: parsed once per flow, but never a stale allow."""

from __future__ import annotations

from mitmproxy.test import tflow

from nhi_gateway.policy.decision import DECISION_KEY, decision_of, set_decision
from nhi_gateway.policy.decision import Action, Decision, Stage

ALLOW = Decision(Action.ALLOW, Stage.POLICY, "allowed by rule 'r'", rule_id="r", operation="GET x")


def test_a_decision_set_is_the_one_read_back():
    f = tflow.tflow()
    set_decision(f, ALLOW)
    assert decision_of(f) is decision_of(f)
    assert decision_of(f).allowed and decision_of(f).rule_id == "r"


def test_a_replaced_decision_dict_is_read_anew():
    f = tflow.tflow()
    set_decision(f, ALLOW)
    assert decision_of(f).allowed
    f.metadata[DECISION_KEY] = {**f.metadata[DECISION_KEY], "action": "deny", "status": 403}
    assert decision_of(f).action == Action.DENY


def test_an_allow_changed_in_place_to_deny_is_a_deny():
    f = tflow.tflow()
    set_decision(f, ALLOW)
    assert decision_of(f).allowed
    f.metadata[DECISION_KEY]["action"] = "deny"
    assert not decision_of(f).allowed


def test_a_copied_flow_carries_its_decision():
    f = tflow.tflow()
    set_decision(f, ALLOW)
    g = f.copy()
    assert decision_of(g).allowed and decision_of(g) is not decision_of(f)
    assert decision_of(tflow.tflow()) is None
