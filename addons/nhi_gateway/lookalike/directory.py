"""The look-alike tenant's directory: users, groups, applications, service principals, and the
client applications that can ask the token endpoint for tokens.

Object data is fixed (stable GUIDs, so tests and policies can name objects); credentials are not:
client secrets and certificates are generated on first start and kept in the state directory,
so nothing in the source tree looks like a secret.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nhi_gateway.lookalike.minting import GRAPH_APP_ID
from nhi_gateway.lookalike.pki import SigningKey

TENANT_ID = "8a1f3c52-6d4e-4b7a-9c2f-5e0d1b7a3f96"
TENANT_DOMAIN = "nhilab.onmicrosoft.com"
# A second, real-looking tenant that is not ours: for "token from another tenant" tests.
FOREIGN_TENANT_ID = "3e9b0d47-1c2a-4f85-8b6e-d07a94c2e15b"

MCP_DIRECTORY = "mcp-directory"
ROTATION_BOT = "rotation-bot"
# The gateway's own registration: it resolves callers' group membership with this credential.
NHI_GATEWAY = "nhi-gateway"
# The App ID URI of the gateway's own API: workloads ask for `api://nhi-gateway/.default` to get the
# token they put in the proxy credentials (v2, aud = the gateway's client id), next to Graph's.
GATEWAY_API_URI = "api://nhi-gateway"

# The gateway's registration also exposes its approval API (Expose an API: the scope below, App ID
# URI api://<client id>, v2 tokens) and is a public client that approvers sign in to with the
# device code flow (`nhi-gateway approvals login`). The look-alike tenant binds the authentication
# context to multi-factor sign-in: a token carries it in acrs only after an MFA sign-in.
APPROVALS_SCOPE = "Approvals.Decide"
APPROVALS_AUTH_CONTEXT = "c1"

_CLIENTS_FILE = "clients.json"
_CREATED = "2024-03-14T09:26:53Z"


def _guid(name: str) -> str:
    # Stable across restarts and machines, distinct per object.
    return str(uuid.uuid5(uuid.UUID(TENANT_ID), name))


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _years_later(iso: str, years: int) -> str:
    start = datetime.datetime.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")
    return start.replace(year=start.year + years).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_client_secret() -> str:
    """A fresh secret in the shape Entra issues (40 characters, ``Q~`` at offset 4), so secret
    scanners and maskers downstream are exercised on realistic input."""
    alphabet = string.ascii_letters + string.digits + "_-.~"
    head = "".join(secrets.choice(alphabet) for _ in range(3))
    tail = "".join(secrets.choice(alphabet) for _ in range(34))
    return f"{head}8Q~{tail}"


@dataclass
class PasswordCredential:
    key_id: str
    display_name: str
    secret: str
    start: str
    end: str

    def graph_view(self) -> dict:
        """How Graph shows a stored secret: never the value, only its first three characters."""
        return {
            "customKeyIdentifier": None,
            "displayName": self.display_name,
            "endDateTime": self.end,
            "hint": self.secret[:3],
            "keyId": self.key_id,
            "secretText": None,
            "startDateTime": self.start,
        }


@dataclass
class ClientApp:
    """An application registration that can use the client-credentials grant."""

    name: str
    app_id: str  # the client id
    object_id: str  # the application object
    sp_object_id: str  # its service principal: the token's oid/sub
    roles: tuple[str, ...]
    certificate: SigningKey
    cert_path: Path
    key_path: Path
    passwords: list[PasswordCredential] = field(default_factory=list)

    def secret_matches(self, candidate: str) -> bool:
        return any(hmac.compare_digest(p.secret.encode(), candidate.encode()) for p in self.passwords)

    def key_credential(self, *, with_key: bool) -> dict:
        der = self.certificate.der
        return {
            "customKeyIdentifier": hashlib.sha1(der).hexdigest().upper(),  # noqa: S324 - Graph's thumbprint
            "displayName": f"CN={self.name}",
            "endDateTime": self.certificate.certificate.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            # Graph returns the certificate only to $select=keyCredentials on a single object.
            "key": base64.b64encode(der).decode("ascii") if with_key else None,
            "keyId": _guid(f"keycred:{self.name}"),
            "startDateTime": self.certificate.certificate.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "type": "AsymmetricX509Cert",
            "usage": "Verify",
        }


# name -> (application permissions granted to it)
_CLIENT_SEEDS: dict[str, tuple[str, ...]] = {
    MCP_DIRECTORY: ("User.Read.All", "Group.Read.All"),
    ROTATION_BOT: ("Application.ReadWrite.OwnedBy",),
    NHI_GATEWAY: ("GroupMember.Read.All", "Directory.Read.All"),
}


def _user(alias: str, given: str, surname: str, **fields: object) -> dict:
    upn = f"{alias}@{TENANT_DOMAIN}"
    user = {
        "id": _guid(f"user:{alias}"),
        "accountEnabled": True,
        "displayName": f"{given} {surname}",
        "givenName": given,
        "surname": surname,
        "jobTitle": None,
        "department": None,
        "officeLocation": None,
        "preferredLanguage": "en-US",
        "mail": upn,
        "otherMails": [],
        "proxyAddresses": [f"SMTP:{upn}"],
        "userPrincipalName": upn,
        "mobilePhone": None,
        "businessPhones": [],
        "faxNumber": None,
        "streetAddress": None,
        "city": None,
        "state": None,
        "postalCode": None,
        "country": None,
        "employeeId": None,
        "onPremisesSamAccountName": None,
        "onPremisesSecurityIdentifier": None,
        "onPremisesImmutableId": None,
        "identities": [
            {"signInType": "userPrincipalName", "issuer": TENANT_DOMAIN, "issuerAssignedId": upn}
        ],
        "userType": "Member",
        "createdDateTime": _CREATED,
    }
    user.update(fields)
    return user


def _seed_users() -> list[dict]:
    # Microsoft's demo-tenant personas; phone numbers are in the 555-01xx range reserved for fiction.
    return [
        _user(
            "AdeleV", "Adele", "Vance",
            jobTitle="Retail Manager", department="Retail", officeLocation="18/2111",
            otherMails=["adele.vance@example.com"],
            mobilePhone="+1 425 555 0109", businessPhones=["+1 425 555 0101"], faxNumber="+1 425 555 0199",
            streetAddress="205 108th Ave NE", city="Bellevue", state="WA", postalCode="98004", country="United States",
            employeeId="E10492", onPremisesSamAccountName="adelev",
            onPremisesSecurityIdentifier="S-1-5-21-1180699209-877415012-3182924384-1104",
            onPremisesImmutableId="mX4l1dQ2dUqYb3V8vS3Lhg==",
        ),
        _user(
            "AlexW", "Alex", "Wilber",
            jobTitle="Marketing Assistant", department="Marketing", officeLocation="131/1104",
            mobilePhone="+1 858 555 0110", businessPhones=["+1 858 555 0110"],
            streetAddress="9256 Towne Center Dr", city="San Diego", state="CA", postalCode="92121",
            country="United States",
            employeeId="E10517", onPremisesSamAccountName="alexw",
            onPremisesSecurityIdentifier="S-1-5-21-1180699209-877415012-3182924384-1105",
            onPremisesImmutableId="b2Xh8e0c4Ue6n1Qk0Zr7Aw==",
        ),
        _user(
            "MeganB", "Megan", "Bowen",
            jobTitle="Payroll Specialist", department="Finance", officeLocation="12/1110",
            otherMails=["megan.bowen@example.org"],
            mobilePhone="+1 412 555 0109", businessPhones=["+1 412 555 0109"],
            streetAddress="30 Isabella St", city="Pittsburgh", state="PA", postalCode="15212", country="United States",
            employeeId="E10288", onPremisesSamAccountName="meganb",
            onPremisesSecurityIdentifier="S-1-5-21-1180699209-877415012-3182924384-1106",
            onPremisesImmutableId="Qn5tPj2yS0m2zT0g3oQWnA==",
        ),
        _user(
            "LeeG", "Lee", "Gu",
            jobTitle="Director", department="Manufacturing", officeLocation="23/3101",
            mobilePhone="+1 913 555 0101", businessPhones=["+1 913 555 0101"],
            streetAddress="10801 Mastin Blvd", city="Overland Park", state="KS", postalCode="66210",
            country="United States", employeeId="E10003",
        ),
        # A B2B guest: the UPN is mangled with #EXT# and the real address sits in identities/otherMails.
        _user(
            "jordan.reyes_example.com#EXT#", "Jordan", "Reyes",
            mail="jordan.reyes@example.com", otherMails=["jordan.reyes@example.com"],
            proxyAddresses=["SMTP:jordan.reyes@example.com"], userType="Guest", preferredLanguage=None,
            identities=[
                {"signInType": "federated", "issuer": "ExternalAzureAD",
                 "issuerAssignedId": "jordan.reyes@example.com"},
            ],
        ),
    ]


def _group(name: str, description: str, *, security: bool, mail: bool = False, unified: bool = False) -> dict:
    nickname = name.lower().replace(" ", "-")
    return {
        "id": _guid(f"group:{name}"),
        "createdDateTime": _CREATED,
        "description": description,
        "displayName": name,
        "groupTypes": ["Unified"] if unified else [],
        "mail": f"{nickname}@{TENANT_DOMAIN}" if mail else None,
        "mailEnabled": mail,
        "mailNickname": nickname,
        "securityEnabled": security,
        "visibility": "Private" if unified else None,
    }


class Directory:
    """The seeded tenant. Mutations (addPassword) are kept in memory and, for secrets of
    registered clients, in the state directory so the token endpoint honours them."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.tenant_id = TENANT_ID
        self.tenant_domain = TENANT_DOMAIN
        self.users = _seed_users()
        self.clients: dict[str, ClientApp] = {}  # by client id
        self._load_or_create_clients()

        by_alias = {u["userPrincipalName"].split("@")[0]: u["id"] for u in self.users}
        readers = _group("NHI Directory Readers", "Workloads allowed to read the directory", security=True)
        automation = _group("All Automation", "Every non-human identity", security=True)
        finance = _group("Finance", "Finance department", security=True, mail=True, unified=True)
        retail = _group("Retail", "Retail team", security=False, mail=True, unified=True)
        self.groups = [readers, automation, finance, retail]
        mcp = self.client_by_name(MCP_DIRECTORY)
        bot = self.client_by_name(ROTATION_BOT)
        # Direct members, by group id. Readers sits inside All Automation, so membership checks
        # have to be transitive to get the right answer.
        self.members: dict[str, list[str]] = {
            readers["id"]: [mcp.sp_object_id],
            automation["id"]: [readers["id"], bot.sp_object_id],
            finance["id"]: [by_alias["MeganB"], by_alias["LeeG"]],
            retail["id"]: [by_alias["AdeleV"], by_alias["AlexW"]],
        }
        # rotation-bot owns mcp-directory's registration: Application.ReadWrite.OwnedBy lets it
        # add secrets to exactly that one.
        self.owners: dict[str, list[str]] = {
            mcp.object_id: [bot.sp_object_id],
            bot.object_id: [],
        }
        self.legacy_app = {
            "id": _guid("app:legacy-reporting"),
            "appId": _guid("appid:legacy-reporting"),
            "displayName": "legacy-reporting",
            "createdDateTime": _CREATED,
            "signInAudience": "AzureADMyOrg",
            "keyCredentials": [],
            "passwordCredentials": [
                {
                    "customKeyIdentifier": None, "displayName": "nightly export",
                    "endDateTime": "2026-03-14T09:26:53Z", "hint": "Xq2",
                    "keyId": _guid("pwd:legacy-reporting"), "secretText": None,
                    "startDateTime": _CREATED,
                }
            ],
            "requiredResourceAccess": [],
        }

    # --- client credentials ------------------------------------------------------------------

    def _load_or_create_clients(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / _CLIENTS_FILE
        stored: dict = json.loads(path.read_text()) if path.exists() else {}
        for name, roles in _CLIENT_SEEDS.items():
            key_path, cert_path = self.state_dir / f"{name}.key.pem", self.state_dir / f"{name}.pem"
            if key_path.exists() and cert_path.exists():
                cert = SigningKey.load(key_path, cert_path)
            else:
                cert = SigningKey.generate(common_name=name)
                cert.save(key_path, cert_path)
            passwords = [PasswordCredential(**p) for p in stored.get(name, {}).get("passwords", [])]
            if not passwords:
                start = _now_iso()
                passwords = [
                    PasswordCredential(
                        key_id=str(uuid.uuid4()), display_name="initial", secret=new_client_secret(),
                        start=start, end=_years_later(start, 2),
                    )
                ]
            client = ClientApp(
                name=name,
                app_id=_guid(f"appid:{name}"),
                object_id=_guid(f"app:{name}"),
                sp_object_id=_guid(f"sp:{name}"),
                roles=roles,
                certificate=cert,
                cert_path=cert_path,
                key_path=key_path,
                passwords=passwords,
            )
            self.clients[client.app_id] = client
        self._save_clients()

    def _save_clients(self) -> None:
        data = {
            c.name: {"passwords": [vars(p) for p in c.passwords]} for c in self.clients.values()
        }
        path = self.state_dir / _CLIENTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.chmod(0o600)
        tmp.replace(path)

    def client_by_name(self, name: str) -> ClientApp:
        for c in self.clients.values():
            if c.name == name:
                return c
        raise KeyError(name)

    # --- Graph objects -------------------------------------------------------------------------

    def applications(self, *, with_keys: bool = False) -> list[dict]:
        apps = [self._application(c, with_keys=with_keys) for c in self.clients.values()]
        return apps + [self.legacy_app]

    def _application(self, client: ClientApp, *, with_keys: bool) -> dict:
        return {
            "id": client.object_id,
            "appId": client.app_id,
            "uniqueName": client.name,  # an alternate key: applications(uniqueName='...')
            "displayName": client.name,
            "createdDateTime": _CREATED,
            "signInAudience": "AzureADMyOrg",
            "keyCredentials": [client.key_credential(with_key=with_keys)],
            "passwordCredentials": [p.graph_view() for p in client.passwords],
            "requiredResourceAccess": [
                {
                    "resourceAppId": GRAPH_APP_ID,
                    "resourceAccess": [{"id": _guid(f"role:{r}"), "type": "Role"} for r in client.roles],
                }
            ],
        }

    def service_principals(self) -> list[dict]:
        sps = [
            {
                "id": c.sp_object_id,
                "accountEnabled": True,
                "appDisplayName": c.name,
                "appId": c.app_id,
                "appOwnerOrganizationId": self.tenant_id,
                "uniqueName": c.name,
                "displayName": c.name,
                "servicePrincipalNames": [c.app_id],
                "servicePrincipalType": "Application",
                "keyCredentials": [],
                "passwordCredentials": [],
            }
            for c in self.clients.values()
        ]
        sps.append({
            "id": _guid("sp:microsoft-graph"),
            "accountEnabled": True,
            "appDisplayName": "Microsoft Graph",
            "appId": GRAPH_APP_ID,
            "appOwnerOrganizationId": "f8cdef31-a31e-4b4a-93e4-5f571e91255a",  # Microsoft's own tenant
            "displayName": "Microsoft Graph",
            "servicePrincipalNames": [GRAPH_APP_ID, "https://graph.microsoft.com"],
            "servicePrincipalType": "Application",
            "keyCredentials": [],
            "passwordCredentials": [],
        })
        return sps

    def find_user(self, key: str) -> dict | None:
        """By object id or userPrincipalName, case-insensitively, as Graph resolves /users/{key}."""
        key = key.lower()
        return next((u for u in self.users if key in (u["id"], u["userPrincipalName"].lower())), None)

    def member_groups(self, object_id: str, *, security_enabled_only: bool) -> list[str]:
        """Transitive group ids of a user, service principal or group (getMemberGroups)."""
        found: list[str] = []
        frontier = [object_id.lower()]
        while frontier:
            member = frontier.pop()
            for group_id, members in self.members.items():
                if member in members and group_id not in found:
                    found.append(group_id)
                    frontier.append(group_id)
        if security_enabled_only:
            security = {g["id"] for g in self.groups if g["securityEnabled"]}
            found = [g for g in found if g in security]
        return found

    def add_password(self, application_id: str, display_name: str) -> dict | None:
        """addPassword: a new secret for an application; the only time its value is shown."""
        client = next((c for c in self.clients.values() if c.object_id == application_id.lower()), None)
        if client is None:
            return None
        start = _now_iso()
        credential = PasswordCredential(
            key_id=str(uuid.uuid4()), display_name=display_name, secret=new_client_secret(),
            start=start, end=_years_later(start, 2),
        )
        client.passwords.append(credential)
        self._save_clients()
        return {
            "customKeyIdentifier": None,
            "displayName": credential.display_name,
            "endDateTime": credential.end,
            "hint": credential.secret[:3],
            "keyId": credential.key_id,
            "secretText": credential.secret,
            "startDateTime": credential.start,
        }

    def approvals_api(self) -> dict:
        """The approval API's app registration, as a policy's ``approvals`` section names it."""
        client_id = self.client_by_name(NHI_GATEWAY).app_id
        return {"client_id": client_id, "app_id_uri": f"api://{client_id}", "scope": APPROVALS_SCOPE,
                "auth_context": APPROVALS_AUTH_CONTEXT}

    def client_summary(self) -> dict[str, dict]:
        """What the look-alike tells tests and the demo about each registered client."""
        return {
            c.name: {
                "client_id": c.app_id,
                "application_object_id": c.object_id,
                "object_id": c.sp_object_id,
                "display_name": c.name,
                "roles": list(c.roles),
                "secret": c.passwords[0].secret,
                "cert_path": str(c.cert_path),
                "key_path": str(c.key_path),
                "cert_thumbprint": c.certificate.x5t,
            }
            for c in self.clients.values()
        }
