"""Reading a policy file: YAML to a checked :class:`~nhi_gateway.policy.model.Policy`.

Every mistake is reported as :class:`PolicyError` with ``file:line:column``, what is wrong and
what to do, and nothing else ever escapes, so a bad edit stops a start (or is refused on reload,
keeping the last good policy) instead of failing requests later. What the policy means is
described in :mod:`nhi_gateway.policy.model`.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from nhi_gateway.identity.principal import AuthMethod, TokenSource
from nhi_gateway.masking.masks import BinaryBodies, MaskProfile
from nhi_gateway.policy.decision import Action
from nhi_gateway.policy.document import Unusual, read_fast
from nhi_gateway.policy.model import (
    ANY_METHOD,
    DEFAULT_APPROVAL_TIMEOUT,
    DEFAULT_LEEWAY,
    Approval,
    ApprovalsConfig,
    ClientSecretGrants,
    IdentityConfig,
    IssuerConfig,
    ODataLimits,
    OperationMatch,
    Policy,
    PrincipalMatch,
    Rule,
    Schedule,
    SourceTrust,
    TokenRequirement,
    Upstream,
)
from nhi_gateway.policy.shape import (
    WHAT,
    ApprovalDoc,
    MaskProfileDoc,
    ODataDoc,
    OperationDoc,
    PolicyDoc,
    RuleDoc,
    ScheduleDoc,
    WhenDoc,
    detail_of,
    first_error,
)

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


def _lc(fn, *args) -> Pos | None:
    try:
        line, col = fn(*args)
        return (int(line), int(col))
    except Exception:  # noqa: BLE001 - merged (<<) keys and odd nodes have no recorded position
        return None


def _own_pos(node: object) -> Pos | None:
    lc = getattr(node, "lc", None)
    if lc is not None and getattr(lc, "line", None) is not None:
        return (lc.line, lc.col)
    return None


def position(doc: Any, loc: tuple, *, key: bool = False) -> Pos:
    """Where the value at ``loc`` was written (0-based), or the key that holds it; the nearest
    place that has a position when ``loc`` leads into a value it cannot follow."""
    node, pos, key_pos = doc, (0, 0), None
    for step in loc:
        lc = getattr(node, "lc", None)
        if isinstance(node, dict) and _has(node, step):
            key_pos = (_lc(lc.key, step) if lc is not None else None) or pos
            child = node[step]
            pos = _own_pos(child) if isinstance(child, dict | list) else None
            pos = pos or (_lc(lc.value, step) if lc is not None else None) or key_pos
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            child = node[step]
            item = (_lc(lc.item, step) if lc is not None else None) or pos
            pos = (_own_pos(child) if isinstance(child, dict | list) else None) or item
            key_pos = None
        else:
            break
        node = child
    return (key_pos or pos) if key else pos


def _has(mapping: dict, key: Any) -> bool:
    try:
        return key in mapping
    except TypeError:  # an unhashable place cannot be a key
        return False


def describe(doc: Any, loc: tuple) -> str:
    """The name of a place in the messages: ``identity.tenants[0]``, ``rule 'r': when.app_ids``,
    ``masking profile 'pii'.fields: 'mail'``."""
    if not loc:
        return "the policy"
    if loc[0] == "rules" and len(loc) >= 2 and isinstance(loc[1], int):
        rules = doc.get("rules") if isinstance(doc, dict) else None
        rule = rules[loc[1]] if isinstance(rules, list) and 0 <= loc[1] < len(rules) else None
        head = f"rule '{rule['id']}'" if isinstance(rule, dict) and isinstance(rule.get("id"), str) else f"rules[{loc[1]}]"
        return head + (f": {_path(loc[2:])}" if len(loc) > 2 else "")
    if loc[:2] == ("masking", "profiles") and len(loc) >= 3:
        head, rest = f"masking profile '{loc[2]}'", loc[3:]
        if len(rest) >= 2 and rest[0] in ("fields", "paths", "detectors") and isinstance(rest[1], str):
            return f"{head}.{rest[0]}: '{rest[1]}'"
        return head + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in rest)
    return _path(loc)


def _path(loc: tuple) -> str:
    return "".join(f"[{s}]" if isinstance(s, int) else (f".{s}" if i else str(s)) for i, s in enumerate(loc))


class _Loader:
    """One policy text: read, checked against :class:`~nhi_gateway.policy.shape.PolicyDoc`, built."""

    def __init__(self, source: str, text: str, environ: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.text = text
        self.environ = os.environ if environ is None else environ
        self.doc: Any = None

    def fail(self, pos: Pos, message: str, hint: str = "") -> NoReturn:
        raise PolicyError(self.source, pos[0] + 1, pos[1] + 1, message, hint)

    def fail_at(self, loc: tuple, message: str, hint: str = "", at: tuple = (), key: bool = False,
                inside: tuple | None = None, up: int = 0) -> NoReturn:
        """``message`` with :data:`~nhi_gateway.policy.shape.WHAT` naming ``loc`` (or a place ``up``
        levels above it), at ``loc + at``."""
        pos = position(self.doc, loc + tuple(at), key=key)
        if inside:
            pos = self.inside(pos, *inside)
        self.fail(pos, message.replace(WHAT, describe(self.doc, loc[:len(loc) - up]), 1), hint)

    def inside(self, pos: Pos, text: str, offset: int) -> Pos:
        """The position of ``text[offset]`` when ``text`` is written as is (plain or quoted, on
        one line) at ``pos``; ``pos`` itself otherwise."""
        lines = self.text.splitlines()
        line = lines[pos[0]] if 0 <= pos[0] < len(lines) else ""
        start = pos[1] + (1 if line[pos[1]:pos[1] + 1] in ("'", '"') else 0)
        return (pos[0], start + offset) if line.startswith(text, start) else pos

    # -- YAML ----------------------------------------------------------------------------------

    def read_yaml(self, fast: bool = True) -> Any:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import MarkedYAMLError, YAMLError
        from ruamel.yaml.reader import ReaderError

        if fast:
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

    # -- the policy ----------------------------------------------------------------------------

    def load(self) -> Policy:
        try:
            return self.load_from(fast=True)
        except PolicyError:
            # Mistakes are reported from ruamel.yaml's reading, the reference for positions: the fast
            # reader places an empty value after its key, ruamel.yaml at the next token. Only a
            # policy that does not load pays for the second reading.
            return self.load_from(fast=False)

    def load_from(self, *, fast: bool) -> Policy:
        doc = self.doc = self.read_yaml(fast)
        if doc is None:
            raise PolicyError(
                self.source,
                1,
                1,
                "the policy file is empty",
                "start with 'version: 1'; see policies/example.yaml",
            )
        context = {"line_of": lambda i: position(doc, ("rules", i))[0] + 1, "environ": self.environ}
        try:
            shape = PolicyDoc.model_validate(doc, context=context)
        except ValidationError as e:
            err = first_error(e.errors(include_url=False, include_input=False))
            ctx = detail_of(err) if err["type"] == "policy" else None
            if ctx is None:  # a check that says nothing of its own: still a place and pydantic's words
                self.fail_at(tuple(err["loc"]), f"{WHAT}: {err['msg']}")
            loc = tuple(err["loc"]) + tuple(ctx.get("sub") or ())
            if ctx.get("where"):  # a place elsewhere in the file (the variable a profile's key needs)
                self.fail(position(self.doc, tuple(ctx["where"])), ctx["message"], ctx.get("hint", ""))
            self.fail_at(loc, ctx["message"], ctx.get("hint", ""), tuple(ctx.get("at") or ()),
                         bool(ctx.get("key")), ctx.get("inside"), ctx.get("up", 0))
        return self.policy(shape)

    def policy(self, shape: PolicyDoc) -> Policy:
        identity = shape.identity
        def trust(doc) -> SourceTrust | None:
            if doc is None:
                return None
            return SourceTrust(
                frozenset(a.strip() for a in doc.audiences),
                tuple(IssuerConfig(i.issuer, i.discovery_url()) for i in doc.issuers),
                bool(getattr(doc, "graph_token", False)),
            )

        config = IdentityConfig(
            frozenset(identity.tenants),
            trust(identity.proxy),
            trust(identity.bearer),
            DEFAULT_LEEWAY if identity.leeway_seconds is None else identity.leeway_seconds,
            ClientSecretGrants(identity.client_secret_grants or ClientSecretGrants.FLAG),
        )
        upstreams = [Upstream(u.host, TokenRequirement(u.token or TokenRequirement.ANY)) for u in shape.upstreams]
        profiles: dict[str, MaskProfile] = {}
        default_profile = None
        if shape.masking is not None:
            default_profile = shape.masking.default_profile
            for name, doc in (shape.masking.profiles or {}).items():
                profiles[name] = self.mask_profile(name, doc)
        approvals = None
        if shape.approvals is not None:
            a = shape.approvals
            approvals = ApprovalsConfig(a.webhook, a.client_id, a.app_id_uri, a.scope or "Approvals.Decide",
                                        a.require_auth_context, bool(a.require_mfa), a.login_client_id)
        report_all = shape.mode == "report"
        rules = [self.rule(i, r, report_all) for i, r in enumerate(shape.rules or ())]
        return Policy(self.source, config, upstreams, profiles, rules, default_profile, approvals,
                      report_default=report_all)

    @staticmethod
    def mask_profile(name: str, doc: MaskProfileDoc) -> MaskProfile:
        return MaskProfile(
            name,
            dict(doc.fields or {}),
            paths=dict(doc.paths or {}),
            detectors=dict(doc.detectors or {}),
            binary=BinaryBodies(doc.binary) if doc.binary is not None else None,
            pseudonym_key=getattr(doc, "pseudonym_key", None),
        )

    def rule(self, index: int, doc: RuleDoc, report_all: bool = False) -> Rule:
        line, column = position(self.doc, ("rules", index))
        action = Action(doc.action)
        # The policy's mode: report is the default of its deny and approve rules; an allow rule has
        # nothing to report.
        report_only = doc.mode == "report" if doc.mode is not None else report_all and action is not Action.ALLOW
        return Rule(
            doc.id,
            Action(doc.action),
            tuple(self.operation(o) for o in doc.operations),
            self.when(doc.when) if doc.when is not None else PrincipalMatch(),
            doc.mask,
            doc.description or "",
            line + 1,
            odata=self.odata(doc.odata) if doc.odata is not None else None,
            schedule=self.schedule(doc.schedule) if doc.schedule is not None else None,
            approval=self.approval(doc.approval) if doc.approval is not None else None,
            column=column + 1,
            report_only=report_only,
        )

    @staticmethod
    def operation(doc: OperationDoc) -> OperationMatch:
        methods = frozenset(doc.methods)
        if ANY_METHOD in methods:
            methods = frozenset({ANY_METHOD})
        odata = _Loader.odata(doc.odata) if doc.odata is not None else None
        return OperationMatch(doc.host, methods, doc.paths, odata)

    @staticmethod
    def odata(doc: ODataDoc) -> ODataLimits:
        return ODataLimits(
            tuple(dict.fromkeys(doc.forbid_select or ())),
            tuple(dict.fromkeys(doc.forbid_expand or ())),
            doc.max_top,
            tuple(dict.fromkeys(doc.allow_select)) if doc.allow_select is not None else None,
        )

    @staticmethod
    def schedule(doc: ScheduleDoc) -> Schedule:
        return Schedule(doc.days or frozenset(), doc.hours or (), doc.timezone or "", doc.valid_from, doc.valid_until)

    @staticmethod
    def approval(doc: ApprovalDoc) -> Approval:
        return Approval(
            frozenset(doc.approvers.users or ()),
            frozenset(doc.approvers.groups or ()),
            DEFAULT_APPROVAL_TIMEOUT if doc.timeout is None else doc.timeout,
            doc.max_grant,
        )

    @staticmethod
    def when(doc: WhenDoc) -> PrincipalMatch:
        def ids(values):
            return frozenset(values) if values is not None else None

        return PrincipalMatch(
            anonymous=bool(doc.anonymous),
            app_ids=ids(doc.app_ids),
            object_ids=ids(doc.object_ids),
            groups=ids(doc.groups),
            roles=frozenset(r.strip().casefold() for r in doc.roles) if doc.roles is not None else None,
            tenants=ids(doc.tenants),
            auth_methods=frozenset(AuthMethod(a) for a in doc.auth_methods) if doc.auth_methods is not None else None,
            app_only=doc.app_only,
            token_sources=frozenset(TokenSource(t) for t in doc.token_sources) if doc.token_sources is not None else None,
            managed_identities=ids(doc.managed_identities),
        )
