"""Graph request normalisation: one operation, one canonical form; ambiguous spellings refused."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nhi_gateway.policy.operation import Operation, OperationError, normalize_host, parse_query

GRAPH = "graph.microsoft.com"


def op(
    target: str, method: str = "GET", host: str = GRAPH, port: int | None = 443, scheme: str = "https"
) -> Operation:
    return Operation.from_request(method, scheme, host, port, target)


def key(o: Operation) -> tuple:
    return (o.method, o.host, o.port, o.version, o.path)


@pytest.mark.parametrize(
    ("canonical", "spellings"),
    [
        (
            "/v1.0/users/adele@contoso.com",
            [
                "/v1.0/users/adele@contoso.com",
                "/v1.0/users/Adele@Contoso.com",
                "/V1.0/USERS/adele@contoso.com",
                "/v1.0/users/adele%40contoso.com",
                "/v1.0/users('adele@contoso.com')",
                "/v1.0/Users('ADELE%40contoso.com')",
                "//v1.0//users///adele@contoso.com/",
                "/v1.0/./users/adele@contoso.com",
                "/v1.0/groups/../users/adele@contoso.com",
                "/v1.0/users/x/%2e%2e/adele@contoso.com",
                "/%761.0/%75sers/adele@contoso.com",
                "https://graph.microsoft.com/v1.0/users/adele@contoso.com",
            ],
        ),
        (
            "/v1.0/applications/appid=5a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b/addpassword",
            [
                "/v1.0/applications(appId='5a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b')/addPassword",
                "/v1.0/applications(appid='5A8F3C2E-1B4D-4E6F-9A7B-0C1D2E3F4A5B')/addPassword",
                "/v1.0/applications(appId=5a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b)/addpassword",
                "/v1.0/applications( appId = '5a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b' )/addPassword",
                "/v1.0/applications(appId=%275a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b%27)/addPassword",
                "/v1.0/applications/appId=5a8f3c2e-1b4d-4e6f-9a7b-0c1d2e3f4a5b/addPassword",
            ],
        ),
        (
            "/v1.0/users/o'neil@contoso.com",
            ["/v1.0/users('o''neil@contoso.com')", "/v1.0/users/o'neil@contoso.com"],
        ),
        (
            "/beta/groups/g1/members/$count",
            ["/beta/groups('g1')/members/$count", "/BETA/Groups/G1/Members/$COUNT"],
        ),
        ("/v1.0/users/delta", ["/v1.0/users/delta()", "/v1.0/users/delta"]),
        (
            "/v1.0/x/range/address=a1,sheet=s",
            ["/v1.0/x/range(address='A1',sheet='S')", "/v1.0/x/range(sheet='S',address='A1')"],
        ),
        ("/v1.0", ["/v1.0", "/v1.0/", "/v1.0//", "/v1.0/users/.."]),
        ("/", ["/", "//", "/./"]),
    ],
)
def test_spellings_of_one_operation_normalise_to_one_form(canonical, spellings):
    forms = {op(s).full_path for s in spellings}
    assert forms == {canonical}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("/v1.0/users", "/beta/users"),
        ("/v1.0/users/a", "/v1.0/users/b"),
        ("/v1.0/users/a/b", "/v1.0/users/a"),
        ("/v1.0/applications/x/addpassword", "/v1.0/applications/x/addkey"),
        ("/v1.0/users", "/users"),  # an unversioned path is not silently versioned
    ],
)
def test_different_operations_stay_different(a, b):
    assert key(op(a)) != key(op(b))


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/v1.0/users%2Fx", "encoded slash"),
        ("/v1.0/users%2fx", "encoded slash"),
        ("/v1.0/users/x%5C..%5Cgroups", "encoded backslash"),
        ("/v1.0/users/x\\..\\groups", "backslash"),
        ("/v1.0/users/x%00", "NUL"),
        ("/v1.0/users/x%252F..%252Fgroups", "double percent-encoding"),
        ("/v1.0/users/%252e%252e", "double percent-encoding"),
        ("/v1.0/users/x%zz", "malformed percent-encoding"),
        ("/v1.0/users/x%4", "malformed percent-encoding"),
        ("/v1.0/users/%C0%AE%C0%AE", "not valid UTF-8"),  # overlong '.'
        ("/v1.0/users/x%0d%0aHost:%20evil", "control character"),
        ("/..", "above the root"),
        ("/v1.0/../../users", "above the root"),
        ("/%2e%2e/v1.0/users", "above the root"),
        ("/v1.0/users#fragment", "fragment"),
        ("*", "must start with '/'"),
        ("users", "must start with '/'"),
        ("", "empty request target"),
        ("/v1.0/users('x", "OData key segment"),
        ("/v1.0/users(x')", "OData key segment"),
        ("/v1.0/users('')", "empty or dot key"),
        ("/v1.0/users('..')/manager", "empty or dot key"),
        ("/v1.0/a(b)c", "OData key segment"),
        ("/v1.0/users(a='1',a='2')", "repeated key name"),
        ("/v1.0/users('a','b')", "several unnamed keys"),
        ("https://evil.example/v1.0/users", "not 'graph.microsoft.com'"),
    ],
)
def test_ambiguous_targets_are_refused(target, message):
    with pytest.raises(OperationError) as e:
        op(target)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("graph.microsoft.com", "graph.microsoft.com"),
        ("GRAPH.Microsoft.COM", "graph.microsoft.com"),
        ("graph.microsoft.com.", "graph.microsoft.com"),
        ("graph\uff0emicrosoft\uff0ecom", "graph.microsoft.com"),  # fullwidth dots (UTS #46)
        ("bücher.example", "xn--bcher-kva.example"),
        ("[::1]", "[::1]"),
    ],
)
def test_host_normalisation(host, expected):
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    "host", ["", "graph.microsoft.com:443", "graph..microsoft.com", "a b", "graph.microsoft.com..", "[zz]"]
)
def test_bad_hosts_are_refused(host):
    with pytest.raises(OperationError):
        normalize_host(host)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$select=id,mail&$top=5", (("$select", "id,mail"), ("$top", "5"))),
        ("select=id&TOP=5", (("$select", "id"), ("$top", "5"))),  # beta: $ optional
        ("$SELECT=keyCredentials", (("$select", "keyCredentials"),)),
        ("%24select=keyCredentials", (("$select", "keyCredentials"),)),
        ("$filter=startswith(displayName,'a b')", (("$filter", "startswith(displayName,'a b')"),)),
        ("$search=%22displayName%3Aal%22", (("$search", '"displayName:al"'),)),
        ("$filter=a+eq+1", (("$filter", "a eq 1"),)),
        ("a=1&&b", (("a", "1"), ("b", ""))),
        ("api-version=1.1", (("api-version", "1.1"),)),
        ("", ()),
    ],
)
def test_query_options(raw, expected):
    assert parse_query(raw, graph=True) == expected


def test_query_options_keep_dollarless_names_off_graph():
    assert parse_query("select=x", graph=False) == (("select", "x"),)


def test_query_is_parsed_from_the_target():
    o = op("/beta/users?select=id,mail&$expand=manager")
    assert o.query == (("$select", "id,mail"), ("$expand", "manager"))
    assert o.param("$select") == ["id,mail"]
    assert o.path == "/users"
    assert o.raw_target == "/beta/users?select=id,mail&$expand=manager"


def test_nul_in_query_is_refused():
    with pytest.raises(OperationError, match="NUL"):
        op("/v1.0/users?$filter=a%00")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("get", "https", "Graph.Microsoft.com", None, "/v1.0/users"), "GET graph.microsoft.com /v1.0/users"),
        (("post", "https", GRAPH, 443, "/beta"), "POST graph.microsoft.com /beta"),
        (("GET", "http", "example.com", None, "/A/B"), "GET example.com:80 /a/b"),
        (("GET", "https", "example.com", 8443, "/v1.0/x"), "GET example.com:8443 /v1.0/x"),
    ],
)
def test_str(args, expected):
    assert str(Operation.from_request(*args)) == expected


def test_version_is_split_only_on_graph_hosts():
    o = op("/v1.0/x", host="example.com")
    assert (o.version, o.path) == ("", "/v1.0/x")
    g = op("/v1.0/x")
    assert (g.version, g.path, g.segments) == ("v1.0", "/x", ("x",))


def test_parentheses_are_literal_off_graph():
    o = op("/a(b)", host="login.microsoftonline.com")
    assert o.path == "/a(b)"


def test_type_cast_segments_are_kept():
    o = op("/v1.0/servicePrincipals/abc/transitiveMemberOf/microsoft.graph.group")
    assert o.segments == ("serviceprincipals", "abc", "transitivememberof", "microsoft.graph.group")


@pytest.mark.parametrize("method", ["", "GE T", "GET\r\n", None])
def test_bad_methods_are_refused(method):
    with pytest.raises(OperationError):
        op("/v1.0/users", method=method)


@pytest.mark.parametrize(("scheme", "port"), [("ftp", None), ("https", 0), ("https", 70000)])
def test_bad_ports_are_refused(scheme, port):
    with pytest.raises(OperationError):
        op("/v1.0/users", scheme=scheme, port=port)


_PATH_ALPHABET = string.ascii_letters + string.digits + "/.%()'=,$@_-~ \\#?\x00é"


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=_PATH_ALPHABET, max_size=40), st.sampled_from([GRAPH, "login.microsoftonline.com"]))
def test_any_target_is_refused_or_canonical(tail, host):
    """Whatever the target, the result is an OperationError or a path already in canonical form:
    so a rule sees one form, and feeding that form back in yields the same operation."""
    try:
        o = op("/" + tail, host=host)
    except OperationError:
        return
    assert o.path.startswith("/")
    assert "//" not in o.path
    assert o.path == "/" or not o.path.endswith("/")
    assert o.path == o.path.casefold()
    assert not {".", ".."} & set(o.segments)
    assert "\\" not in o.path and "\x00" not in o.path


# --- OData options: $select, $expand and $top at every depth ------------------------------------

from nhi_gateway.policy.operation import ODataQuery, read_odata  # noqa: E402


@pytest.mark.parametrize(
    ("query", "selects", "expands", "tops"),
    [
        ("", (), (), ()),
        ("$select=id,displayName", (("id",), ("displayname",)), (), ()),
        ("select=KeyCredentials", (("keycredentials",),), (), ()),  # the $ is optional
        ("%24select=keyCredentials", (("keycredentials",),), (), ()),
        ("$SELECT=%6BeyCredentials", (("keycredentials",),), (), ()),  # decoded once
        ("$select=*", (("*",),), (), ()),
        ("$select=", (), (), ()),
        ("$select= id , mail ", (("id",), ("mail",)), (), ()),
        ("$select=microsoft.graph.user/mail", (("microsoft.graph.user", "mail"),), (), ()),
        ("$select=a&$select=b", (("a",), ("b",)), (), ()),  # every occurrence counts
        ("$top=5&top=7", (), (), ("5", "7")),
        ("$expand=owners", (), (("owners",),), ()),
        ("$expand=members/$ref", (), (("members", "$ref"),), ()),
        ("$expand=*", (), (("*",),), ()),
        (
            "$expand=owners($select=keyCredentials;$expand=owners($top=999))&$top=5",
            (("keycredentials",),),
            (("owners",), ("owners",)),
            ("999", "5"),
        ),
        ("$expand=owners(select=id;top=2)", (("id",),), (("owners",),), ("2",)),  # $ optional inside
        (
            "$expand=memberOf($filter=startswith(displayName,'a,b;c)'))",
            (),
            (("memberof",),),
            (),
        ),  # commas, semicolons and parentheses inside quotes do not split
        ("$expand=a,b($select=x,y)", (("x",), ("y",)), (("a",), ("b",)), ()),
    ],
)
def test_odata_options_are_read_at_every_depth(query, selects, expands, tops):
    q = op("/v1.0/applications" + (f"?{query}" if query else "")).odata
    assert (q.selects, q.expands, q.tops, q.problem) == (selects, expands, tops, "")


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("$expand=owners($select=x", "unbalanced '('"),
        ("$expand=owners)", "unbalanced ')'"),
        ("$expand=owners($filter=name eq 'x)", "unterminated quote"),
        ("$select=key%2543redentials", "percent-escape"),  # %25 -> % : a second decoder would act
        ("$select=a,,b", "empty item"),
        ("$select=a//b", "empty item"),
        ("$expand=owners($select=id)x", "text after the options"),
        ("$expand=owners($select)", "cannot read the option"),
        ("$compute=keyCredentials as k", "$compute cannot be judged"),
        ("$apply=groupby((keyCredentials))", "$apply cannot be judged"),
        ("$expand=" + "a($expand=" * 20 + "b" + ")" * 20, "nested too deeply"),
    ],
)
def test_odata_options_that_cannot_be_read_are_not_guessed_at(query, problem):
    q = op(f"/v1.0/applications?{query}").odata
    assert problem in q.problem


def test_odata_is_read_from_the_canonical_query():
    assert read_odata((("$select", "a"),)) == ODataQuery(selects=(("a",),), selected=True)
    # non-Graph hosts keep option names as written: "select" is not OData there
    login = op("/t/oauth2/v2.0/token?select=x", host="login.microsoftonline.com")
    assert login.odata == ODataQuery()


# --- every spelling of an object is the same object (issue 18, item 1) ------------------------------

APP = "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f"


@pytest.mark.parametrize(
    ("canonical", "spellings"),
    [
        (
            f"/v1.0/applications/{APP}/addpassword",
            [
                f"/v1.0/applications/{APP}/addPassword",
                f"/v1.0/applications('{APP}')/addPassword",
                f"/v1.0/applications({APP})/addPassword",
                f"/v1.0/applications(id='{APP}')/addPassword",
                f"/v1.0/applications(Id='{APP}')/addPassword",
                f"/v1.0/applications(ID='{APP}')/addPassword",
                f"/v1.0/applications(id={APP})/addPassword",
                f"/v1.0/applications/{APP}/microsoft.graph.addPassword",
                f"/v1.0/applications(id='{APP}')/Microsoft.Graph.addPassword",
                f"/v1.0/applications/{APP}/microsoft.graph.application/addPassword",
                f"/v1.0/applications/{APP}/microsoft.graph.directoryObject/microsoft.graph.addPassword",
                f"/v1.0/applications/microsoft.graph.application/{APP}/addPassword",
                f"/v1.0/directoryObjects/{APP}/microsoft.graph.application/addPassword",
                f"/v1.0/directoryObjects('{APP}')/microsoft.graph.application/microsoft.graph.addPassword",
                f"/v1.0/directoryObjects/microsoft.graph.application/{APP}/addPassword",
            ],
        ),
        (
            "/v1.0/users/adele@contoso.com",
            ["/v1.0/users(userPrincipalName='adele@contoso.com')", "/v1.0/users(UserPrincipalName='Adele@Contoso.com')",
             "/v1.0/directoryObjects/adele@contoso.com/microsoft.graph.user"],
        ),
        (
            f"/v1.0/users/{APP}",
            [f"/v1.0/users(Id='{APP}')", f"/v1.0/directoryObjects/{APP}/microsoft.graph.user",
             f"/v1.0/users/{APP}/microsoft.graph.user", f"/v1.0/directoryObjects/microsoft.graph.user/{APP}"],
        ),
        (
            f"/v1.0/serviceprincipals/{APP}/getmembergroups",
            [f"/v1.0/servicePrincipals/{APP}/microsoft.graph.getMemberGroups",
             f"/v1.0/directoryObjects/{APP}/microsoft.graph.servicePrincipal/getMemberGroups"],
        ),
        (f"/v1.0/directoryobjects/{APP}", [f"/v1.0/directoryObjects/{APP}/microsoft.graph.directoryObject"]),
        ("/v1.0/users", ["/v1.0/directoryObjects/microsoft.graph.user", "/v1.0/users/microsoft.graph.user"]),
        # Casts that narrow a collection keep their namespace: a cast is not a navigation property.
        (f"/v1.0/users/{APP}/memberof/microsoft.graph.group", [f"/v1.0/users/{APP}/memberOf/microsoft.graph.group"]),
    ],
)
def test_every_spelling_of_an_object_is_one_path(canonical, spellings):
    assert {op(s).full_path for s in spellings} == {canonical}


@pytest.mark.parametrize(
    ("target", "path"),
    [
        # Alternate keys stay what they are: which object they name is resolved against Graph.
        (f"/v1.0/applications(appId='{APP}')/addPassword", f"/applications/appid={APP}/addpassword"),
        ("/v1.0/applications(uniqueName='rotation')/addPassword", "/applications/uniquename=rotation/addpassword"),
        (f"/v1.0/servicePrincipals(appId='{APP}')", f"/serviceprincipals/appid={APP}"),
    ],
)
def test_alternate_keys_keep_their_name(target, path):
    assert op(target).path == path
