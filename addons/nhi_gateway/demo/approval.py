"""The demo's approval step: a risky request waits for a person.

rotation-bot, which authenticates with its certificate, asks Graph to add a client secret to
mcp-directory's registration (it owns it). The demo's policy is the example policy with one rule
more, ``secret-rotation`` (:func:`policy_with_approval`), which holds the request; Adele Vance,
named as its approver, signs in for the approval API with ``nhi-gateway approvals login`` (MSAL's
device code flow against the look-alike Entra: she enters the code and passes MFA, which the
look-alike tenant binds to the authentication context the policy asks for) and answers with the
commands an approver uses: ``nhi-gateway approvals list`` and ``nhi-gateway approvals approve ID``.
Her token is for the gateway's own app registration, never a Graph token, and reaches no file.
Only then does the request reach Graph, and the new secret comes back masked.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from nhi_gateway.lookalike.minting import mint_client_assertion
from nhi_gateway.lookalike.pki import SigningKey
from nhi_gateway.masking.masks import MASK
from nhi_gateway.demo.workload import JsonLinesCursor, Outcome, Step, from_workload

BOT = "rotation-bot"
APPROVER = ("0f573d36-fa84-5b0a-917c-50d218f4571b", "Adele Vance", "AdeleV")  # named by the example policy
REASON = "rotation ticket CHG-1042"
STEP = Step("rotate a secret, approved by a person", "approval", 200, "allow")
WAIT = 30.0  # seconds for the request to be held, and for it to finish once approved
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


logging.getLogger("httpx").setLevel(logging.WARNING)  # the demo prints what happens itself


# Added to the example policy for this step. The example's no-credential-minting rule denies
# addPassword to everyone, and a deny beats an approve: in the demo's copy it keeps denying every
# identity that holds a static secret (mcp-directory, step 4), and certificate identities get no
# allow rule for it, only this one, with a person's yes.
APPROVE_RULE = f"""
  # Added by the demo (nhi_gateway/demo/approval.py): a person approves first. The request is held
  # until someone named under approval.approvers answers with their own Entra token:
  #   nhi-gateway approvals list
  #   nhi-gateway approvals approve <id> [--for 30m] --reason "ticket"    (or: deny <id>)
  - id: secret-rotation
    description: rotation-bot adds client secrets to the applications it owns, each time a person approves.
    action: approve
    when:
      app_ids: [a00780c4-4e70-52ba-ab0f-9b41ac40647f]   # rotation-bot
      auth_methods: [certificate]
    operations:
      - host: graph.microsoft.com
        methods: [POST]
        paths: ["/applications/{{id}}/addPassword"]
    approval:
      approvers:
        users: [{APPROVER[0]}]   # {APPROVER[1]}
      timeout: 5m
      max_grant: 1h
"""
NARROWED = "    # In the demo's copy: identities holding a static secret (see secret-rotation below).\n" \
           "    when: {auth_methods: [client_secret, public_client, unknown]}\n"


def policy_with_approval(example: Path, out: Path) -> Path:
    """``example`` with :data:`APPROVE_RULE` appended to its rules and its no-credential-minting
    rule narrowed to identities that hold a static secret, written to ``out``. Edited as text, so
    the copy reads like the original; checked by loading it."""
    from nhi_gateway.policy.loader import PolicyError, load_policy

    if load_policy(example).rule("secret-rotation") is not None:
        return example  # the example policy has the rule itself: nothing to add
    lines = example.read_text().splitlines(keepends=True)
    try:
        rule = next(i for i, line in enumerate(lines) if line.strip() == "- id: no-credential-minting")
        action = next(i for i in range(rule, len(lines)) if lines[i].strip() == "action: deny")
    except StopIteration:
        raise ValueError(f"{example} has no rule no-credential-minting for the demo to narrow") from None
    text = "".join(lines[: action + 1]) + NARROWED + "".join(lines[action + 1 :])
    out.write_text(f"# The demo's policy: {example}, with rule secret-rotation.\n"
                   + text.rstrip("\n") + "\n" + APPROVE_RULE)
    try:
        policy = load_policy(out)
    except PolicyError as e:
        raise ValueError(f"{example} changed shape: the demo could not add its approval rule: {e}") from e
    deny, approve = policy.rule("no-credential-minting"), policy.rule("secret-rotation")
    if deny is None or deny.when.auth_methods is None or approve is None:
        raise ValueError(f"{example} changed shape: the demo could not add its approval rule")
    return out


def _client(gateway: dict) -> httpx.Client:
    return httpx.Client(proxy=f"http://{gateway['host']}:{gateway['port']}", verify=gateway["ca_cert"],
                        timeout=WAIT * 2, trust_env=False)


def bot_token(entra: dict, gateway: dict) -> str:
    """client_credentials with a certificate, through the gateway, as MSAL does it."""
    bot = entra["apps"][BOT]
    key = SigningKey.load(Path(bot["key_path"]), Path(bot["cert_path"]))
    assertion = mint_client_assertion(key, client_id=bot["client_id"], audience=entra["token_endpoint"])
    with _client(gateway) as client:
        r = client.post(entra["token_endpoint"], data={
            "grant_type": "client_credentials", "client_id": bot["client_id"], "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion, "scope": "https://graph.microsoft.com/.default"})
    r.raise_for_status()
    return r.json()["access_token"]


class SignInFailed(Exception):
    pass


def _cli_env(api: str, **more: str) -> dict:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "NHI_APPROVER_TOKEN"}
    env.update(NHI_APPROVALS_API=api, **more)
    return env


def approver_login(entra: dict, api: str) -> tuple[str, list[str]]:
    """``nhi-gateway approvals login`` as the approver runs it: the device code flow, answered by
    the approver at the look-alike's device login with MFA. Returns her token (kept in this
    process's memory only) and what the command said."""
    _, _, alias = APPROVER
    authority = entra["local_authority"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nhi_gateway.cli.main", "approvals", "login", "--authority", authority, "--no-keyring"],
        env=_cli_env(api, REQUESTS_CA_BUNDLE=entra["ca_cert"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    try:
        while not (found := re.search(r"enter the code (\S+)", "".join(said))):
            line = proc.stderr.readline() if proc.stderr else ""
            if not line:
                raise SignInFailed("approvals login ended before asking for a code: " + "".join(said).strip())
            said.append(line)
        with httpx.Client(verify=ssl.create_default_context(cafile=entra["ca_cert"]), trust_env=False,
                          timeout=WAIT) as client:
            r = client.post(f"{authority}/{entra['tenant_id']}/oauth2/deviceauth",
                            data={"otc": found.group(1), "user": f"{alias}@{entra['tenant_domain']}", "mfa": "true"})
        if r.status_code != 200:
            raise SignInFailed(f"the look-alike's device login refused the code: {r.text[:200]}")
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said += err.splitlines(keepends=True)
    export = next((line for line in out.splitlines() if line.startswith("export NHI_APPROVER_TOKEN=")), None)
    if proc.returncode != 0 or export is None:
        raise SignInFailed("approvals login failed: " + "".join(said).strip()[-300:])
    token = shlex.split(export.removeprefix("export "))[0].split("=", 1)[1]
    return token, [line.rstrip() for line in said if line.strip()]


def approvals(token: str, api: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nhi_gateway.cli.main", "approvals", *args],
                          env=_cli_env(api, NHI_APPROVER_TOKEN=token), capture_output=True, text=True, timeout=WAIT)


def _show(command: list[str], done: subprocess.CompletedProcess) -> None:
    print(f"    $ nhi-gateway approvals {shlex.join(command)}")
    for line in (done.stdout + done.stderr).rstrip().splitlines():
        print(f"      {line}")


def _held(audit: Path, since: int) -> str | None:
    """The id of the approval the gateway opened (its audit line says so: the approvers' cue)."""
    deadline = time.monotonic() + WAIT
    cursor = JsonLinesCursor(audit)
    cursor.offset = since
    while time.monotonic() < deadline:
        for record in cursor.new_records():
            if record.get("event") == "approval_requested":
                return (record.get("approval") or {}).get("id")
        time.sleep(0.05)
    return None


def run_approval(entra: dict, gateway: dict, audit: Path, received: Path) -> Outcome:
    audit_lines, upstream_lines = JsonLinesCursor(audit), JsonLinesCursor(received)
    api = gateway["approvals_api"]
    target = entra["apps"]["mcp-directory"]["application_object_id"]
    token = bot_token(entra, gateway)
    upstream_lines.new_records()  # the token request is not this step's business
    print(f"  Approval: {BOT} asks Graph to add a client secret to mcp-directory; the gateway holds the request.")
    answer: dict = {}

    def ask() -> None:
        started = time.monotonic()
        try:
            with _client(gateway) as client:
                r = client.post(f"https://graph.microsoft.com/v1.0/applications/{target}/addPassword",
                                json={"passwordCredential": {"displayName": "rotated by rotation-bot"}},
                                headers={"Authorization": f"Bearer {token}"})
            answer.update(status=r.status_code, body=r.json(), held=time.monotonic() - started)
        except (httpx.HTTPError, ValueError) as e:
            answer.update(status=None, error=f"{type(e).__name__}: {e}")

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    held = _held(audit, audit_lines.offset)
    problems: list[str] = []
    person = None
    if held is None:
        problems.append("the request was never held for approval")
    else:
        print(f"  {APPROVER[1]} signs in for the approval API (a token for the gateway's own app registration, "
              "with MFA; her Graph token would be refused):")
        print(f"    $ eval \"$(nhi-gateway approvals login)\"      # NHI_APPROVALS_API={api}")
        try:
            person, said = approver_login(entra, api)
            for i, line in enumerate(said):
                print(f"      {line}")
                if i == 0:
                    print(f"      ({APPROVER[1]} enters the code and passes MFA at the look-alike's device login)")
        except SignInFailed as e:
            problems.append(str(e))
    if held is not None and person is not None:
        print(f"  {APPROVER[1]} answers:")
        _show(["list"], approvals(person, api, "list"))
        command = ["approve", held, "--reason", REASON]
        done = approvals(person, api, *command)
        _show(command, done)
        if done.returncode != 0:
            problems.append(f"approving failed: {done.stderr.strip()}")
    asking.join(WAIT * 2)
    print()

    records = [r for r in audit_lines.new_records() if r.get("method") != "CONNECT"]
    final = next((r for r in reversed(records) if not r.get("event") and "addPassword" in (r.get("url") or "")), None)
    upstream = [r for r in upstream_lines.new_records() if from_workload(r)]
    status, body = answer.get("status"), answer.get("body")
    if status != STEP.status:
        problems.append(f"expected HTTP {STEP.status}, got {status} {answer.get('error') or body}")
    if final is None:
        problems.append("the gateway wrote no audit line for the approved request")
    elif final.get("decision") != "allow" or APPROVER[1] not in (final.get("approver") or ""):
        problems.append(f"expected an allow approved by {APPROVER[1]}, the audit says {final.get('reason')}")
    if not upstream:
        problems.append("the approved request never reached Graph")
    secret = body.get("secretText") if isinstance(body, dict) else None
    if status == 200 and secret != MASK:
        problems.append("the new secret reached the caller unmasked")
    detail = (f"held {answer.get('held', 0):.1f} s for approval {held or '?'}; approved by "
              f"{APPROVER[1]} ({REASON}); secretText: {secret}")
    basis = f"rule {final.get('rule')}" if final and final.get("rule") else ""
    return Outcome(STEP, status, str(final.get("decision", "?")) if final else "?", basis, bool(upstream),
                   detail, problems)
