"""Reading a policy file: YAML to a checked :class:`~nhi_gateway.policy.model.Policy`.

Every mistake is reported as :class:`PolicyError` with ``file:line:column``, what is wrong and
what to do, and nothing else ever escapes, so a bad edit stops a start (or is refused on reload,
keeping the last good policy) instead of failing requests later. What the policy means is
described in :mod:`nhi_gateway.policy.model`.
"""

from __future__ import annotations

import difflib
import gc
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from nhi_gateway.identity.principal import AuthMethod, TokenSource
from nhi_gateway.masking.masks import (
    MIN_KEY_BYTES,
    BinaryBodies,
    Detector,
    JSONPathError,
    MaskProfile,
    PseudonymKey,
    Style,
    compile_path,
)
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.document import Unusual, read_fast
from nhi_gateway.policy.model import (
    ANY_METHOD,
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_LEEWAY,
    MAX_APPROVAL_TIMEOUT,
    MAX_GRANT,
    MAX_LEEWAY,
    MAX_TOP,
    METHODS,
    MIN_GRANT,
    WEEKDAYS,
    Approval,
    ApprovalsConfig,
    ClientSecretGrants,
    IdentityConfig,
    IssuerConfig,
    ODataLimits,
    OperationMatch,
    PathPattern,
    Policy,
    PrincipalMatch,
    Rule,
    Schedule,
    TokenRequirement,
    Upstream,
    _hhmm,
)
from nhi_gateway.policy.operation import GRAPH_HOSTS, GRAPH_VERSIONS, OperationError, normalize_host

_GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]*")
_PLACEHOLDER = re.compile(r"\{[^}]*\}")
_PARAM = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
_BAD_LITERAL = re.compile(r"[{}*%\\\s\x00-\x1f\x7f?#]")
_STS_V1 = "https://sts.windows.net/{tenantid}/"
_STS_V1_DISCOVERY = "https://login.microsoftonline.com/{tenantid}/.well-known/openid-configuration"
# xms_mirid: /subscriptions/<sub>/resourcegroups/<rg>/providers/<namespace>/<type>/<name>[/...]
# An OData property or navigation property name (a type-cast segment has dots).
_PROPERTY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_HOURS = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARM_ID = re.compile(r"/subscriptions/[^/\s]+/resourcegroups/[^/\s]+/providers/[^/\s]+(/[^/\s]+){2,}", re.I)


# --- errors -------------------------------------------------------------------------------------


class PolicyError(Exception):
    """A policy file that cannot be used, with where (1-based line and column) and what to do.

    ``line == 0`` means the error has no position (the file could not be read at all).
    """

    def __init__(self, source: str, line: int, column: int, message: str, hint: str = "") -> None:
        self.source = str(source)
        self.line = line
        self.column = column
        self.message = message
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}" if self.line else self.source
        text = f"{where}: {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class PolicyStore:
    """The current policy of a running gateway. ``reload()`` swaps in a new policy only when it
    loads cleanly; otherwise it raises the :class:`PolicyError` and the last good policy stays.

    Readers take ``store.current`` once per request: the swap is a single reference assignment,
    so a request never sees half of one policy and half of another.
    """

    def __init__(self, policy: Policy | str | Path) -> None:
        """From a loaded policy (reloads read ``policy.source``) or from a path, loaded now."""
        if isinstance(policy, Policy):
            self._path = Path(policy.source)
            self._policy = policy
        else:
            self._path = Path(policy)
            self._policy = load_policy(self._path)
        self._lock = threading.Lock()
        self._generation = 1

    @property
    def path(self) -> Path:
        return self._path

    @property
    def current(self) -> Policy:
        return self._policy

    @property
    def generation(self) -> int:
        """Counts successful loads, so caches keyed on the policy can tell it changed."""
        return self._generation

    def reload(self) -> Policy:
        with self._lock:  # two reloads racing must not install the older file last
            policy = load_policy(self._path)
            self._policy = policy
            self._generation += 1
            return policy


# --- loading -------------------------------------------------------------------------------------


def load_policy(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Policy:
    """Read and check a policy file; raises :class:`PolicyError` and nothing else.

    ``environ`` (default: this process's environment) holds the pseudonym key named by
    ``masking.pseudonym_key_env``."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PolicyError(source, 0, 0, f"cannot read the policy file: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - the loader's promise is PolicyError only
        raise PolicyError(source, 0, 0, f"cannot read the policy file: {e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1  # in bytes: the text has no columns yet
        raise PolicyError(source, line, col, "the policy file is not UTF-8", "save it as UTF-8") from e
    return parse_policy(text, source, environ=environ)


def parse_policy(text: str | bytes, source_name: str = "<policy>", *,
                 environ: Mapping[str, str] | None = None) -> Policy:
    """Parse and check policy text; raises :class:`PolicyError` and nothing else."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8-sig")
        # A policy is thousands of small objects and no cycles: the collector would walk them all
        # again and again while they are made (a third of a 5,000-rule load), for nothing.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return _Loader(source_name, text, environ).load()
        finally:
            if collecting:
                gc.enable()
    except PolicyError:
        raise
    except RecursionError as e:
        raise PolicyError(source_name, 1, 1, "the policy is nested too deeply to read") from e
    except UnicodeDecodeError as e:
        raise PolicyError(source_name, 1, 1, "the policy text is not UTF-8", "save it as UTF-8") from e
    except Exception as e:  # noqa: BLE001 - the loader's promise is PolicyError only
        raise PolicyError(
            source_name,
            1,
            1,
            f"could not read the policy ({type(e).__name__}: {e})",
            "this is a bug in nhi-gateway's policy loader; please report it with the file",
        ) from e


def _line_col(text: str, offset: int) -> tuple[int, int]:
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


Pos = tuple[int, int]  # 0-based, as ruamel.yaml reports them


@dataclass(frozen=True)
class _Value:
    """A YAML value with where it was written."""

    value: Any
    pos: Pos
    key_pos: Pos | None = None  # where the key that holds it was written, for "missing key" errors


def _kind(v: object) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list | tuple):  # tuple: ruamel's complex key "? [a, b]"
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    if isinstance(v, date):
        return "a date"
    if isinstance(v, bytes):
        return "binary data"
    if type(v).__name__ == "TaggedScalar":
        return "a value with a custom tag"
    return f"a {type(v).__name__}"


def _lc(fn, *args) -> Pos | None:
    try:
        line, col = fn(*args)
        return (int(line), int(col))
    except Exception:  # noqa: BLE001 - merged (<<) keys and odd nodes have no recorded position
        return None


def _node_pos(node: object, default: Pos) -> Pos:
    lc = getattr(node, "lc", None)
    if lc is not None and getattr(lc, "line", None) is not None:
        return (lc.line, lc.col)
    return default


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'?" if close else ""


class _Loader:
    def __init__(self, source: str, text: str, environ: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.text = text
        self.environ = os.environ if environ is None else environ
        self.profiles: dict[str, MaskProfile] = {}
        self.upstream_hosts: set[str] = set()
        self.tenants: frozenset[str] = frozenset()

    def fail(self, pos: Pos, message: str, hint: str = "") -> NoReturn:
        raise PolicyError(self.source, pos[0] + 1, pos[1] + 1, message, hint)

    # -- YAML ----------------------------------------------------------------------------------

    def read_yaml(self) -> Any:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import MarkedYAMLError, YAMLError
        from ruamel.yaml.reader import ReaderError

        try:
            return read_fast(self.text)
        except (Unusual, RecursionError):
            pass  # read again by the reference reader, for its values or its error
        yaml = YAML(typ="rt")  # round-trip: keeps .lc line/column on every mapping and list
        try:
            return yaml.load(self.text)
        except MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = e.problem or e.context or "invalid YAML"
            if e.problem and e.context and e.problem.startswith("but "):
                problem = f"{e.context}, {e.problem}"  # "expected X, but found Y"
            elif e.problem and e.context:
                problem = f"{e.problem} ({e.context})"
            message = f"YAML syntax error: {problem}"
            hint = "check the indentation and quoting at this position"
            if "duplicate key" in problem:
                hint = "each key may appear only once in a mapping"
            elif "'\\t'" in problem:
                hint = "indent YAML with spaces, not tabs"
            elif "another document" in problem:
                hint = "a policy file holds one YAML document: remove the '---' line"
            line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
            raise PolicyError(self.source, line, col, message, hint) from e
        except ReaderError as e:
            line, col = _line_col(self.text, e.position or 0)
            raise PolicyError(
                self.source, line, col, f"YAML cannot contain this character: {e.reason}"
            ) from e
        except YAMLError as e:
            raise PolicyError(self.source, 1, 1, f"YAML error: {e}") from e
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            # ruamel's constructors raise these, unmarked, for a value its explicit tag cannot
            # hold: `!!int abc`, `!!bool maybe`, `!!timestamp 2025-13-45`, `!!omap 5`.
            line, col, tag = self._first_tag()
            raise PolicyError(
                self.source, line, col,
                f"YAML cannot read the value tagged {tag}: {e}" if tag else f"YAML cannot read this document: {e}",
                "remove the tag: a policy needs no YAML tags, write the plain value",
            ) from e

    def _first_tag(self) -> tuple[int, int, str]:
        """Where the first explicitly tagged node is (1-based), and its tag as written."""
        from ruamel.yaml import YAML

        try:
            for event in YAML(typ="rt").parse(self.text):
                tag = getattr(event, "tag", None)
                if tag:
                    mark = event.start_mark
                    return mark.line + 1, mark.column + 1, tag.replace("tag:yaml.org,2002:", "!!")
        except Exception:  # noqa: BLE001 - only a position is looked for; the error is already known
            pass
        return 1, 1, ""

    # -- generic shapes ------------------------------------------------------------------------

    def entries(self, node: _Value, what: str) -> list[tuple[str, Pos, _Value]]:
        """The (key, key position, value) of a mapping; keys must be strings."""
        m = node.value
        if not isinstance(m, dict):
            self.fail(node.pos, f"{what} must be a mapping, not {_kind(m)}")
        pos = _node_pos(m, node.pos)
        lc = getattr(m, "lc", None)
        out = []
        for k, v in m.items():
            kpos = (_lc(lc.key, k) if lc is not None else None) or pos
            if not isinstance(k, str):
                self.fail(kpos, f"{what}: keys must be strings, not {_kind(k)}")
            vpos = (_lc(lc.value, k) if lc is not None else None) or kpos
            out.append((k, kpos, _Value(v, _node_pos(v, vpos) if isinstance(v, dict | list) else vpos, kpos)))
        return out

    def mapping(self, node: _Value, what: str, keys: dict[str, bool]) -> dict[str, _Value]:
        """Check ``node`` is a mapping with only ``keys`` (name -> required); null values are
        treated as absent."""
        out: dict[str, _Value] = {}
        for k, kpos, v in self.entries(node, what):
            if k not in keys:
                allowed = ", ".join(keys)
                self.fail(kpos, f"unknown key '{k}' in {what}; allowed keys: {allowed}", _suggest(k, keys))
            if v.value is not None:
                out[k] = v
            elif keys[k]:
                self.fail(kpos, f"{what}: '{k}' has no value")
        for k, required in keys.items():
            if required and k not in out:
                self.fail(node.key_pos or node.pos, f"{what} is missing the required key '{k}'")
        return out

    def seq(self, node: _Value, what: str, *, non_empty: bool = False, hint: str = "") -> list[_Value]:
        s = node.value
        if not isinstance(s, list):
            example = f"write [{s}]" if isinstance(s, str | int) and not isinstance(s, bool) else hint
            self.fail(node.pos, f"{what} must be a list, not {_kind(s)}", example)
        if non_empty and not s:
            self.fail(node.pos, f"{what} must not be empty", hint)
        base = _node_pos(s, node.pos)
        items = []
        for i, v in enumerate(s):
            ipos = (_lc(s.lc.item, i) if hasattr(s, "lc") else None) or base
            items.append(_Value(v, _node_pos(v, ipos) if isinstance(v, dict | list) else ipos))
        return items

    def string(self, node: _Value, what: str, hint: str = "") -> str:
        if not isinstance(node.value, str):
            self.fail(node.pos, f"{what} must be a string, not {_kind(node.value)}", hint)
        if not node.value.strip():
            self.fail(node.pos, f"{what} must not be empty", hint)
        return str(node.value)

    def strings(self, node: _Value, what: str, hint: str = "") -> list[tuple[str, Pos]]:
        return [
            (self.string(v, f"{what}[{i}]", hint), v.pos)
            for i, v in enumerate(self.seq(node, what, non_empty=True, hint=hint))
        ]

    def guids(self, node: _Value, what: str) -> list[tuple[str, Pos]]:
        """Lower-cased GUIDs with their positions."""
        out = []
        for i, (value, pos) in enumerate(self.strings(node, what)):
            if not _GUID.fullmatch(value.strip()):
                self.fail(
                    pos,
                    f"{what}[{i}]: '{value}' is not a GUID",
                    "use the object's id GUID (e.g. 72f988bf-86f1-41af-91ab-2d7cd011db47), "
                    "not a name or domain",
                )
            out.append((value.strip().lower(), pos))
        return out

    def integer(self, node: _Value, what: str, lo: int, hi: int) -> int:
        v = node.value
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(node.pos, f"{what} must be a whole number, not {_kind(v)}")
        if not lo <= v <= hi:
            self.fail(node.pos, f"{what} must be between {lo} and {hi}, not {v}")
        return int(v)

    def choice(self, node: _Value, what: str, choices: Iterable[str]) -> str:
        choices = list(choices)
        value = self.string(node, what, f"one of: {', '.join(choices)}")
        if value not in choices:
            hint = _suggest(value, choices) or f"use one of: {', '.join(choices)}"
            self.fail(node.pos, f"{what} must be one of {', '.join(choices)}, not '{value}'", hint)
        return value

    # -- the policy ----------------------------------------------------------------------------

    def load(self) -> Policy:
        doc = self.read_yaml()
        if doc is None:
            raise PolicyError(
                self.source,
                1,
                1,
                "the policy file is empty",
                "start with 'version: 1'; see policies/example.yaml",
            )
        top = self.mapping(
            _Value(doc, (0, 0)),
            "the policy",
            {
                "version": True,
                "identity": True,
                "upstreams": True,
                "masking": False,
                "approvals": False,
                "rules": False,
            },
        )
        version = top["version"]
        if isinstance(version.value, bool) or version.value != 1 or not isinstance(version.value, int):
            self.fail(
                version.pos,
                f"unsupported policy version {version.value!r}",
                "this gateway reads 'version: 1'",
            )
        identity = self.identity(top["identity"])
        upstreams = self.upstreams(top["upstreams"])
        default_profile = self.masking(top["masking"]) if "masking" in top else None
        approvals = self.approvals(top["approvals"]) if "approvals" in top else None
        rules = self.rules(top["rules"]) if "rules" in top else []
        return Policy(self.source, identity, upstreams, self.profiles, rules, default_profile, approvals)

    def approvals(self, node: _Value) -> ApprovalsConfig:
        m = self.mapping(node, "approvals", {"webhook": False})
        webhook = None
        if "webhook" in m:
            hint = "e.g. https://hooks.slack.com/services/... (the message names the request and how to approve it)"
            webhook = self.string(m["webhook"], "approvals.webhook", hint).strip()
            try:
                parts = urlsplit(webhook)
                ok = parts.scheme == "https" and bool(parts.hostname) and not parts.username and not parts.password
            except ValueError:
                ok = False
            if not ok:
                self.fail(m["webhook"].pos, f"approvals.webhook: '{webhook}' is not an https URL", hint)
        return ApprovalsConfig(webhook)

    def identity(self, node: _Value) -> IdentityConfig:
        m = self.mapping(
            node,
            "identity",
            {
                "tenants": True,
                "audiences": True,
                "issuers": True,
                "leeway_seconds": False,
                "client_secret_grants": False,
            },
        )
        self.tenants = frozenset(t for t, _ in self.guids(m["tenants"], "identity.tenants"))
        audiences = frozenset(a.strip() for a, _ in self.strings(m["audiences"], "identity.audiences"))
        issuers = tuple(
            self.issuer(item, f"identity.issuers[{i}]")
            for i, item in enumerate(self.seq(m["issuers"], "identity.issuers", non_empty=True))
        )
        leeway = DEFAULT_LEEWAY
        if "leeway_seconds" in m:
            leeway = self.integer(m["leeway_seconds"], "identity.leeway_seconds", 0, MAX_LEEWAY)
        secret_grants = ClientSecretGrants.FLAG
        if "client_secret_grants" in m:
            secret_grants = ClientSecretGrants(
                self.choice(
                    m["client_secret_grants"],
                    "identity.client_secret_grants",
                    [c.value for c in ClientSecretGrants],
                )
            )
        return IdentityConfig(self.tenants, audiences, issuers, leeway, secret_grants)

    def issuer(self, node: _Value, what: str) -> IssuerConfig:
        if isinstance(node.value, dict):
            m = self.mapping(node, what, {"issuer": True, "discovery": False})
            template = self.url(m["issuer"], f"{what}.issuer")
            discovery = self.url(m["discovery"], f"{what}.discovery") if "discovery" in m else None
        else:
            template = self.url(node, what)
            discovery = None
        if discovery is None:
            if template == _STS_V1:
                discovery = _STS_V1_DISCOVERY  # sts.windows.net serves no metadata itself
            else:
                discovery = template.rstrip("/") + "/.well-known/openid-configuration"
        return IssuerConfig(template, discovery)

    def url(self, node: _Value, what: str) -> str:
        hint = "e.g. https://login.microsoftonline.com/{tenantid}/v2.0"
        value = self.string(node, what, hint).strip()
        for placeholder in _PLACEHOLDER.findall(value):
            if placeholder != "{tenantid}":
                self.fail(
                    node.pos,
                    f"{what}: unknown placeholder {placeholder}",
                    "the only placeholder is {tenantid}",
                )
        try:
            parts = urlsplit(value.replace("{tenantid}", "t"))
            ok = parts.scheme == "https" and bool(parts.hostname)
        except ValueError:
            ok = False
        if not ok:
            self.fail(node.pos, f"{what}: '{value}' is not an https URL", hint)
        return value

    def upstreams(self, node: _Value) -> list[Upstream]:
        out = []
        for i, item in enumerate(self.seq(node, "upstreams")):
            what = f"upstreams[{i}]"
            m = self.mapping(item, what, {"host": True, "token": False})
            host = self.host(m["host"], f"{what}.host")
            if host in self.upstream_hosts:
                self.fail(m["host"].pos, f"{what}: host '{host}' is listed twice")
            self.upstream_hosts.add(host)
            token = TokenRequirement.ANY
            if "token" in m:
                token = TokenRequirement(
                    self.choice(m["token"], f"{what}.token", [t.value for t in TokenRequirement])
                )
            out.append(Upstream(host, token))
        return out

    def host(self, node: _Value, what: str) -> str:
        value = self.string(node, what, "a host name such as graph.microsoft.com")
        try:
            return normalize_host(value)
        except OperationError:
            self.fail(
                node.pos,
                f"{what}: '{value}' is not a host name",
                "write the host only, without scheme, port or path",
            )

    def masking(self, node: _Value) -> str | None:
        m = self.mapping(node, "masking", {"default_profile": False, "pseudonym_key_env": False, "profiles": False})
        key_env = None
        if "pseudonym_key_env" in m:
            key_env = self.string(m["pseudonym_key_env"], "masking.pseudonym_key_env", "e.g. NHI_MASK_KEY")
            if not _ENV_NAME.fullmatch(key_env):
                self.fail(m["pseudonym_key_env"].pos,
                          f"masking.pseudonym_key_env: '{key_env}' is not an environment variable name",
                          "name the variable that holds the key (letters, digits and _), e.g. NHI_MASK_KEY; "
                          "never put the key itself in the policy")
        if "profiles" in m:
            for name, kpos, pnode in self.entries(m["profiles"], "masking.profiles"):
                what = f"masking profile '{name}'"
                if not _RULE_ID.fullmatch(name):
                    self.fail(kpos, f"{what}: invalid name", "use letters, digits and . _ : -")
                self.profiles[name] = self.mask_profile(name, pnode, what, m.get("pseudonym_key_env"), key_env)
        if "default_profile" in m:
            return self.profile_ref(m["default_profile"], "masking.default_profile")
        return None

    def mask_profile(self, name: str, node: _Value, what: str, key_node: _Value | None,
                     key_env: str | None) -> MaskProfile:
        m = self.mapping(node, what, {"fields": False, "paths": False, "detectors": False, "binary": False})
        if not any(k in m for k in ("fields", "paths", "detectors")):
            self.fail(node.key_pos or node.pos, f"{what} masks nothing: give fields, paths or detectors",
                      "e.g. fields: [mail, mobilePhone], or detectors: [email, graph_secret]")
        fields = self.mask_targets(m["fields"], f"{what}.fields", self.mask_field) if "fields" in m else {}
        paths = self.mask_targets(m["paths"], f"{what}.paths", self.mask_path) if "paths" in m else {}
        detectors = self.mask_targets(m["detectors"], f"{what}.detectors", self.detector) if "detectors" in m else {}
        binary = None
        if "binary" in m:
            binary = BinaryBodies(self.choice(m["binary"], f"{what}.binary", [b.value for b in BinaryBodies]))
        key = None
        uses = [(t, pos) for targets in (fields, paths, detectors) for t, (style, pos) in targets.items()
                if style is Style.PSEUDONYM]
        if uses:
            key = self.pseudonym_key(uses[0], what, key_node, key_env)
        return MaskProfile(
            name,
            {k: s for k, (s, _) in fields.items()},
            paths={k: s for k, (s, _) in paths.items()},
            detectors={k: s for k, (s, _) in detectors.items()},
            binary=binary,
            pseudonym_key=key,
        )

    def mask_targets(self, node: _Value, what: str, check) -> dict[str, tuple[Style, Pos]]:
        """``[a, b]`` (each redacted) or ``{a: style, b: style}``; ``check(text, pos, what)``
        returns the entry as it is kept."""
        out: dict[str, tuple[Style, Pos]] = {}
        styles = [s.value for s in Style]
        if isinstance(node.value, dict):
            items = []
            for k, kpos, v in self.entries(node, what):
                if v.value is None:
                    self.fail(kpos, f"{what}: '{k}' has no style", f"write '{k}: redact' (or {', '.join(styles)})")
                items.append((k, kpos, Style(self.choice(v, f"{what}: '{k}'", styles))))
            if not items:
                self.fail(node.pos, f"{what} must not be empty")
        else:
            hint = "a list (each entry redacted) or a mapping of entry to style (redact, partial, pseudonym)"
            items = [(k, pos, Style.REDACT) for k, pos in self.strings(node, what, hint)]
        folded: dict[str, str] = {}
        for k, kpos, style in items:
            entry = check(k, kpos, what)
            same = folded.get(str(entry).casefold())
            if same is not None and out[same][0] is not style:
                self.fail(kpos, f"{what}: '{entry}' is listed twice with different styles",
                          "names match case-insensitively; keep one entry")
            folded.setdefault(str(entry).casefold(), entry)
            out[entry] = (style, kpos)
        return out

    def mask_field(self, name: str, pos: Pos, what: str) -> str:
        name = name.strip()
        if not name:
            self.fail(pos, f"{what}: a field name must not be empty")
        if "[" in name or "]" in name or name.startswith("$"):
            # A path spelt as a name would silently match nothing, leaving the value unmasked.
            path = name if name.startswith("$") else "$.." + name.lstrip(".").replace("[]", "[*]")
            self.fail(pos, f"{what}: '{name}' is a path, but fields are member names matched wherever they occur",
                      f"list it under paths as '{path}', or give the last name alone")
        return name

    def mask_path(self, text: str, pos: Pos, what: str) -> str:
        text = text.strip()
        try:
            compile_path(text)
        except JSONPathError as e:
            self.fail(self.inside(pos, text, e.offset),
                      f"{what}: invalid JSON path '{text}': {e.message} (at character {e.offset + 1})",
                      e.hint or "supported: $, .name, ['name'], .* or [*], [0], ..name")
        return text

    def inside(self, pos: Pos, text: str, offset: int) -> Pos:
        """The position of ``text[offset]`` when ``text`` is written as is (plain or quoted, on
        one line) at ``pos``; ``pos`` itself otherwise."""
        lines = self.text.splitlines()
        line = lines[pos[0]] if 0 <= pos[0] < len(lines) else ""
        start = pos[1] + (1 if line[pos[1]:pos[1] + 1] in ("'", '"') else 0)
        return (pos[0], start + offset) if line.startswith(text, start) else pos

    def detector(self, text: str, pos: Pos, what: str) -> str:
        names = [d.value for d in Detector]
        if text not in names:
            hint = _suggest(text, names) or f"use one of: {', '.join(names)}"
            self.fail(pos, f"{what}: unknown detector '{text}'", hint)
        return text

    def pseudonym_key(self, use: tuple[str, Pos], what: str, key_node: _Value | None,
                      key_env: str | None) -> PseudonymKey:
        entry, pos = use
        if key_env is None or key_node is None:
            self.fail(pos, f"{what}: '{entry}' asks for pseudonyms, but masking.pseudonym_key_env is not set",
                      "add 'pseudonym_key_env: NHI_MASK_KEY' under masking and set that environment variable "
                      "to a long random value before the gateway starts")
        raw = self.environ.get(key_env)
        # Never the value itself in a message: only whether it is there and how long it is.
        if not raw:
            self.fail(key_node.pos, f"masking.pseudonym_key_env: the environment variable {key_env} is not set "
                                    f"(or empty), and {what} makes pseudonyms with it",
                      f"set {key_env} to a long random value, e.g. {key_env}=$(openssl rand -base64 32), and keep it "
                      "the same across restarts so that pseudonyms stay the same")
        key = raw.encode("utf-8", "surrogateescape")
        if len(key) < MIN_KEY_BYTES:
            self.fail(key_node.pos, f"masking.pseudonym_key_env: the key in {key_env} is {len(key)} bytes long; "
                                    f"a pseudonym key needs at least {MIN_KEY_BYTES}",
                      f"e.g. {key_env}=$(openssl rand -base64 32)")
        return PseudonymKey(key, f"${key_env}")

    def profile_ref(self, node: _Value, what: str) -> str:
        name = self.string(node, what)
        if name not in self.profiles:
            known = ", ".join(self.profiles) or "none are defined"
            hint = _suggest(name, self.profiles) or f"define it under masking.profiles (known: {known})"
            self.fail(node.pos, f"{what}: unknown mask profile '{name}'", hint)
        return name

    def rules(self, node: _Value) -> list[Rule]:
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(self.seq(node, "rules")):
            rule, id_pos = self.rule(item, i)
            if rule.id in seen:
                self.fail(
                    id_pos,
                    f"duplicate rule id '{rule.id}'",
                    f"the first rule with this id is at line {seen[rule.id]}",
                )
            seen[rule.id] = rule.line
            rules.append(rule)
        return rules

    def rule(self, node: _Value, index: int) -> tuple[Rule, Pos]:
        keys = {
            "id": True,
            "description": False,
            "action": True,
            "when": False,
            "operations": True,
            "odata": False,
            "schedule": False,
            "approval": False,
            "mask": False,
        }
        if isinstance(node.value, dict) and isinstance(node.value.get("id"), str):
            what = f"rule '{node.value['id']}'"
        else:
            what = f"rules[{index}]"
        m = self.mapping(node, what, keys)
        rule_id = self.string(m["id"], f"{what}: id")
        if not _RULE_ID.fullmatch(rule_id):
            self.fail(
                m["id"].pos,
                f"{what}: invalid rule id '{rule_id}'",
                "use letters, digits and . _ : - (no spaces)",
            )
        action = Action(self.choice(m["action"], f"{what}: action", [a.value for a in Action]))
        description = self.string(m["description"], f"{what}: description") if "description" in m else ""
        when = self.when(m["when"], what) if "when" in m else PrincipalMatch()
        operations = tuple(
            self.operation(item, f"{what}: operations[{i}]")
            for i, item in enumerate(self.seq(m["operations"], f"{what}: operations", non_empty=True))
        )
        odata = None
        if "odata" in m:
            odata = self.odata(m["odata"], f"{what}: odata")
            for i, om in enumerate(operations):
                if om.host not in GRAPH_HOSTS:
                    self.fail(
                        m["odata"].key_pos or m["odata"].pos,
                        f"{what}: odata limits apply to Graph requests, but operations[{i}] is for '{om.host}'",
                        "move the odata limits into the Graph operations, or the other operation into "
                        "a rule of its own",
                    )
        schedule = self.schedule(m["schedule"], f"{what}: schedule") if "schedule" in m else None
        approval = None
        if action is Action.APPROVE:
            if "approval" not in m:
                self.fail(
                    m["action"].pos,
                    f"{what}: action approve needs 'approval', naming who may approve",
                    "add e.g. approval: {approvers: {groups: [<group id>]}, timeout: 5m}",
                )
            approval = self.approval(m["approval"], f"{what}: approval")
        elif "approval" in m:
            self.fail(
                m["approval"].key_pos or m["approval"].pos,
                f"{what}: 'approval' applies to action: approve only, not {action}",
                "remove it, or make the rule action: approve",
            )
        mask = None
        if "mask" in m:
            if action is Action.DENY:
                self.fail(m["mask"].pos, f"{what}: 'mask' has no effect on a deny rule", "remove it")
            mask = self.profile_ref(m["mask"], f"{what}: mask")
        rule = Rule(
            rule_id,
            action,
            operations,
            when,
            mask,
            description,
            node.pos[0] + 1,
            odata=odata,
            schedule=schedule,
            approval=approval,
            column=node.pos[1] + 1,
        )
        return rule, m["id"].pos

    def odata(self, node: _Value, what: str) -> ODataLimits:
        keys = {"forbid_select": False, "forbid_expand": False, "max_top": False}
        m = self.mapping(node, what, keys)
        if not m:
            self.fail(
                node.key_pos or node.pos,
                f"{what} limits nothing",
                "give forbid_select, forbid_expand or max_top, or remove it",
            )
        names = {}
        for key in ("forbid_select", "forbid_expand"):
            if key not in m:
                continue
            out = []
            for i, (name, pos) in enumerate(self.strings(m[key], f"{what}.{key}", "e.g. [keyCredentials]")):
                name = name.strip()
                if not _PROPERTY.fullmatch(name):
                    self.fail(
                        pos,
                        f"{what}.{key}[{i}]: '{name}' is not a property name",
                        "write one property name such as keyCredentials: '*' and paths are "
                        "covered already, since every segment of a requested path is checked",
                    )
                out.append(name)
            names[key] = tuple(dict.fromkeys(out))
        max_top = self.integer(m["max_top"], f"{what}.max_top", 1, MAX_TOP) if "max_top" in m else None
        return ODataLimits(names.get("forbid_select", ()), names.get("forbid_expand", ()), max_top)

    def schedule(self, node: _Value, what: str) -> Schedule:
        keys = {"days": False, "hours": False, "timezone": False, "valid_from": False, "valid_until": False}
        m = self.mapping(node, what, keys)
        if not m:
            self.fail(
                node.key_pos or node.pos,
                f"{what} is empty",
                "give days, hours (with timezone), valid_from or valid_until, or remove it",
            )
        timezone = ""
        zone = None
        if "timezone" in m:
            timezone = self.string(m["timezone"], f"{what}.timezone", "an IANA name such as Europe/Berlin or UTC")
            timezone = timezone.strip()
            zone = self.zone(timezone, m["timezone"].pos, f"{what}.timezone")
        days: set[int] = set()
        if "days" in m:
            for i, (text, pos) in enumerate(self.one_or_more(m["days"], f"{what}.days", "e.g. [mon-fri]")):
                days |= self.days(text, pos, f"{what}.days[{i}]")
        hours: list[tuple[int, int]] = []
        if "hours" in m:
            for i, (text, pos) in enumerate(self.one_or_more(m["hours"], f"{what}.hours", 'e.g. "08:00-18:00"')):
                hours.append(self.hours(text, pos, f"{what}.hours[{i}]"))
        if (days or hours) and zone is None:
            first = m.get("days") or m["hours"]
            self.fail(
                first.key_pos or first.pos,
                f"{what}: days and hours need a timezone",
                "add timezone: an IANA name such as Europe/Berlin (or UTC): a rule must not change "
                "its meaning with the gateway host's clock settings",
            )
        valid_from = self.instant(m["valid_from"], f"{what}.valid_from", zone) if "valid_from" in m else None
        valid_until = self.instant(m["valid_until"], f"{what}.valid_until", zone) if "valid_until" in m else None
        if valid_from is not None and valid_until is not None and valid_until <= valid_from:
            self.fail(
                m["valid_until"].pos,
                f"{what}: valid_until ({valid_until.isoformat()}) is not after valid_from "
                f"({valid_from.isoformat()})",
                "the rule would never be in force",
            )
        return Schedule(frozenset(days), tuple(sorted(hours)), timezone, valid_from, valid_until)

    def one_or_more(self, node: _Value, what: str, hint: str) -> list[tuple[str, Pos]]:
        if isinstance(node.value, str):
            return [(self.string(node, what, hint), node.pos)]
        return self.strings(node, what, hint)

    def zone(self, name: str, pos: Pos, what: str) -> ZoneInfo:
        try:
            return ZoneInfo(name)
        except Exception:  # noqa: BLE001 - ZoneInfoNotFoundError, ValueError for odd keys, OSError
            from zoneinfo import available_timezones

            hint = _suggest(name, available_timezones()) or "use an IANA name such as Europe/Berlin or UTC"
            self.fail(pos, f"{what}: unknown time zone '{name}'", hint)

    def days(self, text: str, pos: Pos, what: str) -> set[int]:
        first, dash, last = text.strip().lower().partition("-")
        names = [first, last] if dash else [first]
        for name in names:
            if name.strip() not in WEEKDAYS:
                self.fail(
                    pos,
                    f"{what}: '{text.strip()}' is not a day or a range of days",
                    _suggest(name.strip(), WEEKDAYS) or "use mon tue wed thu fri sat sun, or a range: mon-fri",
                )
        start = WEEKDAYS.index(names[0].strip())
        end = WEEKDAYS.index(names[-1].strip())
        return {(start + i) % 7 for i in range((end - start) % 7 + 1)}

    def hours(self, text: str, pos: Pos, what: str) -> tuple[int, int]:
        m = _HOURS.fullmatch(text.strip())
        hint = 'write "HH:MM-HH:MM" in 24-hour time, e.g. "08:00-18:00"; "24:00" ends at midnight'
        if not m:
            self.fail(pos, f"{what}: '{text.strip()}' is not a range of hours", hint)
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2):
            self.fail(pos, f"{what}: '{text.strip()}' is not a time of day", hint)
        start, end = h1 * 3600 + m1 * 60, h2 * 3600 + m2 * 60
        if end == start:
            self.fail(pos, f"{what}: '{text.strip()}' is empty", hint)
        if end < start:
            self.fail(
                pos,
                f"{what}: '{text.strip()}' runs past midnight",
                f'write two ranges: ["{_hhmm(start)}-24:00", "00:00-{_hhmm(end)}"] (days are '
                "checked on the local date of each request)",
            )
        return start, end

    def instant(self, node: _Value, what: str, zone: ZoneInfo | None) -> datetime:
        hint = "write an ISO 8601 time with an offset, e.g. 2025-07-01T08:00:00+02:00 or 2025-07-01T06:00:00Z"
        v = node.value
        if isinstance(v, datetime):
            value = datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, tzinfo=v.tzinfo)
        elif isinstance(v, date):
            self.fail(node.pos, f"{what}: {v.isoformat()} is a date without a time", hint)
        elif isinstance(v, str):
            try:
                value = datetime.fromisoformat(v.strip())
            except ValueError:
                self.fail(node.pos, f"{what}: '{v.strip()}' is not a time", hint)
        else:
            self.fail(node.pos, f"{what} must be a time, not {_kind(v)}", hint)
        if value.tzinfo is None or value.utcoffset() is None:
            if zone is None:
                self.fail(
                    node.pos,
                    f"{what}: '{value.isoformat()}' has no offset and the schedule has no timezone",
                    hint + ", or give the schedule a timezone",
                )
            value = value.replace(tzinfo=zone)
        return value.astimezone(UTC)

    def approval(self, node: _Value, what: str) -> Approval:
        m = self.mapping(node, what, {"approvers": True, "timeout": False, "max_grant": False})
        approvers = self.mapping(m["approvers"], f"{what}.approvers", {"users": False, "groups": False})
        if not approvers:
            self.fail(
                m["approvers"].key_pos or m["approvers"].pos,
                f"{what}.approvers names nobody",
                "give users: [<object id>, ...] and/or groups: [<group id>, ...]",
            )
        users = frozenset(u for u, _ in self.guids(approvers["users"], f"{what}.approvers.users")) \
            if "users" in approvers else frozenset()
        groups = frozenset(g for g, _ in self.guids(approvers["groups"], f"{what}.approvers.groups")) \
            if "groups" in approvers else frozenset()
        timeout = DEFAULT_APPROVAL_TIMEOUT
        if "timeout" in m:
            timeout = self.duration(m["timeout"], f"{what}.timeout", 1, MAX_APPROVAL_TIMEOUT)
        max_grant = None
        if "max_grant" in m:
            max_grant = self.duration(m["max_grant"], f"{what}.max_grant", MIN_GRANT, MAX_GRANT)
        return Approval(users, groups, timeout, max_grant)

    def duration(self, node: _Value, what: str, lo: int, hi: int) -> int:
        hint = "write a duration such as 30s, 5m, 1h or 1h30m"
        v = node.value
        if isinstance(v, int) and not isinstance(v, bool):
            self.fail(node.pos, f"{what}: {v} has no unit", f"{hint} ({v}s if you meant seconds)")
        text = self.string(node, what, hint).strip()
        m = _DURATION.fullmatch(text)
        if not m or not text:
            self.fail(node.pos, f"{what}: '{text}' is not a duration", hint)
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = int(timedelta(days=d, hours=h, minutes=mi, seconds=s).total_seconds())
        if not lo <= seconds <= hi:
            self.fail(
                node.pos,
                f"{what}: {text} is outside {_duration(lo)} to {_duration(hi)}",
                hint,
            )
        return seconds

    def when(self, node: _Value, rule: str) -> PrincipalMatch:
        what = f"{rule}: when"
        keys = {
            "anonymous": False,
            "app_ids": False,
            "object_ids": False,
            "groups": False,
            "roles": False,
            "tenants": False,
            "auth_methods": False,
            "app_only": False,
            "token_sources": False,
            "managed_identities": False,
        }
        m = self.mapping(node, what, keys)
        anonymous = self.boolean(m["anonymous"], f"{what}.anonymous") if "anonymous" in m else False
        if anonymous and len(m) > 1:
            other = next(k for k in m if k != "anonymous")
            self.fail(
                m[other].pos,
                f"{what}: '{other}' cannot be combined with anonymous: true",
                "an anonymous request has no identity to match; write two rules",
            )
        found: dict[str, Any] = {}
        for k in ("app_ids", "object_ids", "groups", "tenants"):
            if k in m:
                found[k] = frozenset(g for g, _ in self.guids(m[k], f"{what}.{k}"))
        if "roles" in m:
            found["roles"] = frozenset(
                r.strip().casefold() for r, _ in self.strings(m["roles"], f"{what}.roles")
            )
        if "tenants" in m:
            for i, (tenant, pos) in enumerate(self.guids(m["tenants"], f"{what}.tenants")):
                if tenant not in self.tenants:
                    self.fail(
                        pos,
                        f"{what}.tenants[{i}]: tenant '{tenant}' is not in identity.tenants, "
                        "so this never matches",
                        "add it to identity.tenants or remove it here",
                    )
        if "auth_methods" in m:
            found["auth_methods"] = frozenset(
                AuthMethod(self.auth_method(v, f"{what}.auth_methods[{i}]"))
                for i, v in enumerate(self.seq(m["auth_methods"], f"{what}.auth_methods", non_empty=True))
            )
        if "app_only" in m:
            found["app_only"] = self.boolean(m["app_only"], f"{what}.app_only")
        if "token_sources" in m:
            found["token_sources"] = frozenset(
                TokenSource(self.choice(v, f"{what}.token_sources[{i}]", [t.value for t in TokenSource]))
                for i, v in enumerate(self.seq(m["token_sources"], f"{what}.token_sources", non_empty=True))
            )
        if "managed_identities" in m:
            ids = self.strings(m["managed_identities"], f"{what}.managed_identities")
            found["managed_identities"] = frozenset(
                self.arm_id(value, pos, f"{what}.managed_identities[{i}]") for i, (value, pos) in enumerate(ids)
            )
        return PrincipalMatch(anonymous=anonymous, **found)

    def boolean(self, node: _Value, what: str) -> bool:
        if not isinstance(node.value, bool):
            self.fail(
                node.pos,
                f"{what} must be true or false, not {_kind(node.value)}",
                "YAML 1.2: write true, not yes",
            )
        return node.value

    def auth_method(self, node: _Value, what: str) -> str:
        value = node.value.strip() if isinstance(node.value, str) else node.value
        if value in ("federated", "federated_credential", "managed_identity"):
            # appidacr/azpacr "2" covers all three: a rule cannot tell them apart, so say so.
            self.fail(
                node.pos,
                f"{what}: '{value}' is not told apart by Entra's tokens",
                "appidacr/azpacr \"2\" means certificate, federated credential or managed identity "
                "alike: write certificate (and managed_identities to name managed identities)",
            )
        choices = [AuthMethod.CERTIFICATE, AuthMethod.CLIENT_SECRET, AuthMethod.PUBLIC_CLIENT, AuthMethod.UNKNOWN]
        return self.choice(_Value(value, node.pos, node.key_pos), what, [str(a) for a in choices])

    def arm_id(self, value: str, pos: Pos, what: str) -> str:
        value = value.strip()
        if not _ARM_ID.fullmatch(value):
            self.fail(
                pos,
                f"{what}: '{value}' is not an Azure resource id",
                "use the token's xms_mirid, e.g. /subscriptions/<subscription>/resourcegroups/<group>"
                "/providers/Microsoft.ManagedIdentity/userAssignedIdentities/<name>",
            )
        return value.lower()

    def operation(self, node: _Value, what: str) -> OperationMatch:
        m = self.mapping(
            node, what, {"host": True, "methods": True, "paths": True, "versions": False, "odata": False}
        )
        host = self.host(m["host"], f"{what}.host")
        if host not in self.upstream_hosts:
            self.fail(
                m["host"].pos,
                f"{what}: host '{host}' is not listed under upstreams",
                "the gateway refuses every host not under upstreams; add it there",
            )
        graph = host in GRAPH_HOSTS
        methods = set()
        for i, (method, pos) in enumerate(
            self.strings(m["methods"], f"{what}.methods", 'e.g. [GET] or ["*"]')
        ):
            method = method.strip().upper()
            if method != ANY_METHOD and method not in METHODS:
                self.fail(
                    pos,
                    f"{what}.methods[{i}]: unknown method '{method}'",
                    _suggest(method, METHODS) or f'use {", ".join(METHODS)} or "*"',
                )
            methods.add(method)
        if ANY_METHOD in methods:
            methods = {ANY_METHOD}
        versions = None
        if "versions" in m:
            if not graph:
                self.fail(
                    m["versions"].pos,
                    f"{what}: versions apply to Graph hosts only, not '{host}'",
                    "remove versions",
                )
            versions = frozenset(
                self.choice(v, f"{what}.versions[{i}]", GRAPH_VERSIONS)
                for i, v in enumerate(self.seq(m["versions"], f"{what}.versions", non_empty=True))
            )
        paths = tuple(
            self.path(v, f"{what}.paths[{i}]", graph, versions)
            for i, v in enumerate(self.seq(m["paths"], f"{what}.paths", non_empty=True))
        )
        odata = None
        if "odata" in m:
            if not graph:
                self.fail(
                    m["odata"].key_pos or m["odata"].pos,
                    f"{what}: odata limits apply to Graph hosts only, not '{host}'",
                    "remove odata",
                )
            odata = self.odata(m["odata"], f"{what}.odata")
        return OperationMatch(host, frozenset(methods), paths, odata)

    def path(self, node: _Value, what: str, graph: bool, versions: frozenset[str] | None) -> PathPattern:
        text = self.string(node, what, 'e.g. "/users/{id}"')
        if not text.startswith("/"):
            self.fail(node.pos, f"{what}: path pattern '{text}' must start with '/'")
        raw = text[1:].split("/") if text != "/" else []
        pattern_version = None
        if graph and raw and raw[0].casefold() in GRAPH_VERSIONS:
            pattern_version = raw.pop(0).casefold()
            if versions is not None:
                self.fail(
                    node.pos,
                    f"{what}: '{text}' names a version and the operation has versions too",
                    "give the version in one place",
                )
        segments: list[str] = []
        for i, seg in enumerate(raw):
            problem, hint = self.segment_problem(seg, last=i == len(raw) - 1, graph=graph)
            if problem:
                self.fail(node.pos, f"{what}: bad path pattern '{text}': {problem}", hint)
            segments.append("*" if _PARAM.fullmatch(seg) else seg.casefold())
        if pattern_version is not None:
            pattern_versions = frozenset({pattern_version})
        elif graph:
            pattern_versions = versions or frozenset(GRAPH_VERSIONS)
        else:
            pattern_versions = frozenset({""})
        return PathPattern(text, tuple(segments), pattern_versions)

    @staticmethod
    def segment_problem(seg: str, *, last: bool, graph: bool) -> tuple[str, str]:
        if seg == "":
            if last:
                return "trailing '/'", "drop it: the canonical path has no trailing slash"
            return "empty segment ('//')", "write a single '/'"
        if seg == "**":
            return (
                ("", "") if last else ("'**' must be the last segment", "use '*' or {name} for one segment")
            )
        if seg == "*" or _PARAM.fullmatch(seg):
            return "", ""
        if seg in (".", ".."):
            return f"'{seg}' segment", "write the path without dot segments"
        if "{" in seg or "}" in seg or "*" in seg:
            return f"wildcard inside segment '{seg}'", "{name}, '*' and '**' must be a whole segment"
        if "%" in seg:
            return (
                f"percent-encoding in '{seg}'",
                "write the decoded text: patterns match the path decoded once",
            )
        if graph and ("(" in seg or ")" in seg):
            return (
                f"OData key syntax in '{seg}'",
                "write the canonical form: /users/{id} matches /users('x'); "
                "/applications/{id} matches /applications(appId='x')",
            )
        if _BAD_LITERAL.search(seg):
            return (
                f"invalid character in '{seg}'",
                "segments are plain text: no spaces, backslashes, '?' or '#'",
            )
        return "", ""
