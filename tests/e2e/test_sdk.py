"""Microsoft's own SDKs through the gateway, configured as users configure them (HTTPS_PROXY and
SSL_CERT_FILE): ``azure-identity`` gets a Graph token from the Entra look-alike with a
certificate (MSAL's client assertion, ``x5t#S256`` base64url with padding) or a client secret,
and ``msgraph-sdk`` reads users through the gateway. Masked answers must still deserialise into
the SDK's typed models (masking keeps JSON types), and a refusal must reach SDK code as its
``ODataError`` with Graph's code and the gateway's message."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from azure.identity.aio import CertificateCredential, ClientSecretCredential
from kiota_abstractions.base_request_configuration import RequestConfiguration
from msgraph import GraphServiceClient
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.models.password_credential import PasswordCredential
from msgraph.generated.models.user import User
from msgraph.generated.applications.item.add_password.add_password_post_request_body import (
    AddPasswordPostRequestBody,
)
from msgraph.generated.users.users_request_builder import UsersRequestBuilder

from ..support.e2e import use_proxy

SCOPES = ["https://graph.microsoft.com/.default"]


def credential(kind: str, lookalike, tmp_path: Path):
    app = lookalike.app("mcp-directory")
    if kind == "certificate":
        # azure-identity wants the key and the certificate in one PEM file.
        pem = tmp_path / "mcp-directory.pem"
        pem.write_bytes(Path(app["key_path"]).read_bytes() + Path(app["cert_path"]).read_bytes())
        pem.chmod(0o600)
        return CertificateCredential(lookalike.tenant_id, app["client_id"], certificate_path=str(pem))
    return ClientSecretCredential(lookalike.tenant_id, app["client_id"], app["secret"])


async def with_client(kind: str, lookalike, tmp_path: Path, work):
    cred = credential(kind, lookalike, tmp_path)
    try:
        return await asyncio.wait_for(work(GraphServiceClient(cred, scopes=SCOPES)), timeout=60)
    finally:
        await cred.close()


@pytest.mark.parametrize("kind", ["certificate", "secret"])
def test_masked_users_deserialise_into_typed_objects(gateway, lookalike, monkeypatch, tmp_path, kind):
    use_proxy(monkeypatch, gateway)

    async def work(client: GraphServiceClient):
        return await client.users.get()

    page = asyncio.run(with_client(kind, lookalike, tmp_path, work))
    users = page.value
    assert len(users) == 5 and all(isinstance(u, User) for u in users)
    adele = next(u for u in users if u.display_name == "Adele Vance")
    assert adele.mail == "[masked]" and adele.user_principal_name == "[masked]"
    assert adele.business_phones == ["[masked]"] and adele.mobile_phone == "[masked]"
    assert adele.job_title == "Retail Manager" and adele.id
    # How the token was got is on record: a certificate is appidacr 2, a secret 1.
    method = "certificate" if kind == "certificate" else "client_secret"
    # (msgraph-sdk asks for /v1.0//users: the empty segment is the same operation once normalised.)
    line = [a for a in gateway.audit() if a.get("operation") == "GET graph.microsoft.com /v1.0/users"][-1]
    assert line["principal"]["auth_method"] == method and line["status"] == 200 and line["masked_fields"] > 0


def test_a_refusal_reaches_sdk_code_as_odata_error(gateway, lookalike, monkeypatch, tmp_path):
    use_proxy(monkeypatch, gateway)
    app_object_id = lookalike.app("mcp-directory")["application_object_id"]

    async def work(client: GraphServiceClient):
        errors = []
        body = AddPasswordPostRequestBody(password_credential=PasswordCredential(display_name="persist"))
        for call in (
            lambda: client.applications.by_application_id(app_object_id).add_password.post(body),
            lambda: client.users.get(request_configuration=RequestConfiguration(
                query_parameters=UsersRequestBuilder.UsersRequestBuilderGetQueryParameters(
                    filter="startswith(mail,'adel')", select=["displayName"]))),
        ):
            with pytest.raises(ODataError) as e:
                await call()
            errors.append(e.value)
        return errors

    minting, oracle = asyncio.run(with_client("certificate", lookalike, tmp_path, work))
    assert minting.response_status_code == 403
    assert minting.error.code == "Authorization_RequestDenied" and "no-credential-minting" in minting.error.message
    assert oracle.response_status_code == 403
    assert oracle.error.code == "Authorization_RequestDenied" and "'mail'" in oracle.error.message
