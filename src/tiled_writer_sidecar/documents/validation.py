"""event-model schema validation at receiver speed, with event-model's verdicts.

`validate_document(name, doc)` returns if event-model accepts the document
and otherwise raises ``ValidationError(Rejection.SCHEMA, "<kind> <JSON path>:
<message>")``: at most 200 characters of document content, printable ASCII
(escapes for the rest). Nothing else leaves it, whatever the document holds:
a check that fails unexpectedly (memory, recursion, a numpy comparison) is a
rejection, never a crash of the receiver.

The fast checks may only say "valid"; anything else goes to event-model's
own validator, which decides and explains. In order:

- events first meet `_plain_event` (exact built-in types, a few C-level
  checks), used only while event-model's event schema is `_EVENT_SCHEMA`
  (compared at compile time);
- then event-model's own schemas, rewritten from draft 2020-12 to draft 7
  and compiled lazily (once per kind) by fastjsonschema; key-only recursive
  defs (``DataType``) are checked by `_KeyRule` at the sites `_rule_sites`
  proves are the only ones. A schema the rewrite does not understand falls
  back to event-model's validator (slow, logged), never to a wrong one.

The rewrite, and why a fast "valid" is event-model's: docs/design.md,
"Validation." under "Upload: one table of outcomes".
"""

from __future__ import annotations

import copy
import itertools
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Final

import fastjsonschema
import jsonschema.exceptions  # type: ignore[import-untyped]
from event_model import DocumentNames, schema_validators, schemas

from tiled_writer_sidecar.errors import ValidationError
from tiled_writer_sidecar.states import Rejection
from tiled_writer_sidecar.text import ascii_text

__all__ = ["validate_document"]

log = logging.getLogger(__name__)

_MESSAGE_CHARS: Final = 200  # path + message: all the document content a detail may show
_PATH_CHARS: Final = 60
_ANNOTATIONS: Final = frozenset({"title", "description", "default", "$comment", "examples"})
_COMBINATORS: Final = ("anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas")

_Check = Callable[[Any], Any]
_OS_RETRY_PAUSES_S: Final = (0.05, 0.2, 0.5)
_fast: dict[str, _Check] = {}


#: ``^([^CHARS]+)$``, event-model's key patterns: with re.search it matches
#: exactly the non-empty keys without any of CHARS (a newline included).
_EXCLUDED_CHARS: Final = re.compile(r"\^\(\[\^([^\]\\\-\^]+)\]\+\)\$\Z")


class _KeyRule:
    """A def that says "every key matches `pattern`, every value: the same, recursively"."""

    def __init__(self, pattern: str) -> None:
        self.search = re.compile(pattern).search
        simple = _EXCLUDED_CHARS.match(pattern)
        self.excluded = re.compile(f"[{re.escape(simple.group(1))}]").search if simple else None

    def follow(self, value: Any) -> None:
        """Raise unless every key of every dict nested in `value` (through dicts) matches."""
        search, excluded = self.search, self.excluded
        stack = [value]
        while stack:
            node = stack.pop()
            if not isinstance(node, dict):
                continue
            if excluded is not None:  # one C-level check for all keys of the dict
                if "" in node or excluded("\x00".join(node)):  # a non-str key: TypeError, slow path
                    raise ValueError("a key does not match its pattern")
            elif not all(map(search, node)):
                raise ValueError("a key does not match its pattern")
            stack += [item for item in node.values() if isinstance(item, dict)]


def _resolve(root: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise NotImplementedError(f"non-local $ref {ref!r}")
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    if not isinstance(target, dict):
        raise NotImplementedError(f"$ref {ref!r} is not an object schema")
    return _resolve(root, target)


def _evaluated_names(root: dict[str, Any], node: dict[str, Any]) -> set[str]:
    """Property names `node` evaluates, following allOf and $ref (nothing fancier)."""
    node = _resolve(root, node)
    if any(key in node for key in (*_COMBINATORS, "patternProperties", "additionalProperties")):
        raise NotImplementedError("unevaluatedProperties over a conditional or open subschema")
    names = set(node.get("properties", {}))
    for sub in node.get("allOf", []):
        names |= _evaluated_names(root, sub)
    return names


def _key_rules(root: dict[str, Any]) -> dict[str, _KeyRule]:
    """``$ref`` -> P for each def that only says "keys match P, values: the same, recursively".

    event-model's ``DataType`` is such a def and applies to every top-level
    value of start, descriptor and stop documents; in fastjsonschema's
    generated code its recursion dominates (~200 us per descriptor), so
    `_KeyRuleSites` checks it instead.
    """
    rules = {}
    for def_name, body in root.get("$defs", {}).items():
        ref = f"#/$defs/{def_name}"
        rest = {key: value for key, value in body.items() if key not in _ANNOTATIONS}
        if (
            rest.keys() != {"patternProperties", "additionalProperties"}
            or rest["additionalProperties"] is not False
        ):
            continue
        patterns: dict[str, Any] = rest["patternProperties"]
        if len(patterns) == 1 and list(patterns.values()) == [{"$ref": ref}]:
            rules[ref] = _KeyRule(next(iter(patterns)))
    return rules


def _rule_bodies(root: dict[str, Any], rules: dict[str, _KeyRule]) -> list[tuple[str, Any]]:
    """The self-reference inside each rule's own def."""
    return [(ref, next(iter(_resolve(root, {"$ref": ref})["patternProperties"].values()))) for ref in rules]


def _is_rule_ref(node: Any, rules: dict[str, _KeyRule]) -> bool:
    return isinstance(node, dict) and node.get("$ref") in rules and not set(node) - _ANNOTATIONS - {"$ref"}


_Site = tuple[tuple[str, ...], "re.Pattern[str] | None", _KeyRule]


def _rule_sites(root: dict[str, Any], rules: dict[str, _KeyRule]) -> tuple[list[_Site], set[int]]:
    """Where key rules apply: (document path, key pattern or None for the value itself, rule).

    Follows only what always applies (properties, allOf, $ref). Also returns
    the identities of the schema nodes found, so that `_compile_fast` can prove
    every use of a rule is covered.
    """
    sites: list[_Site] = []
    found: set[int] = set()

    def visit(node: dict[str, Any], path: tuple[str, ...]) -> None:
        if len(path) > 8:
            raise NotImplementedError("schema nests properties too deep")
        if _is_rule_ref(node, rules):
            sites.append((path, None, rules[node["$ref"]]))
            found.add(id(node))
            return
        if "$ref" in node:
            visit(_resolve(root, {"$ref": node["$ref"]}), path)
        for sub in node.get("allOf", []):
            visit(sub, path)
        for prop, sub in node.get("properties", {}).items():
            visit(sub, (*path, prop))
        for pattern, sub in node.get("patternProperties", {}).items():
            if _is_rule_ref(sub, rules):
                sites.append((path, re.compile(pattern), rules[sub["$ref"]]))
                found.add(id(sub))

    visit(root, ())
    return sites, found


def _to_draft7(root: dict[str, Any], node: Any, rules: dict[str, _KeyRule], replaced: set[int]) -> Any:
    """A draft-7 equivalent of the draft 2020-12 `node` (recursively); key-rule refs -> ``{}``."""
    if isinstance(node, list):
        return [_to_draft7(root, item, rules, replaced) for item in node]
    if not isinstance(node, dict):
        return node
    if _is_rule_ref(node, rules):
        replaced.add(id(node))
        return {}
    out = {key: _to_draft7(root, value, rules, replaced) for key, value in node.items()}
    if "$ref" in out and set(out) - _ANNOTATIONS - {"$ref"}:
        out["allOf"] = [*out.get("allOf", []), {"$ref": out.pop("$ref")}]
    if "prefixItems" in out:
        if "items" in out:
            out["additionalItems"] = out.pop("items")
        out["items"] = out.pop("prefixItems")
    if "unevaluatedProperties" in out:
        if "additionalProperties" in out or any(key in out for key in _COMBINATORS):
            raise NotImplementedError("unevaluatedProperties next to additionalProperties or conditionals")
        names = set(out.get("properties", {}))
        for sub in out.get("allOf", []):
            names |= _evaluated_names(root, sub)
        out["properties"] = {**{name: {} for name in sorted(names)}, **out.get("properties", {})}
        out["additionalProperties"] = out.pop("unevaluatedProperties")
    return out


class _KeyRuleSites:
    """fastjsonschema's check, then the key rules at their sites (raises on failure)."""

    def __init__(self, check: _Check, sites: list[_Site]) -> None:
        self.check = check
        self.sites = sites

    def __call__(self, doc: Any) -> None:
        self.check(doc)
        for path, key_pattern, rule in self.sites:
            value = doc
            for step in path:
                if not isinstance(value, dict) or step not in value:
                    break
                value = value[step]
            else:
                if key_pattern is None:
                    rule.follow(value)
                elif isinstance(value, dict):
                    for key, item in value.items():
                        if key_pattern.search(key):
                            rule.follow(item)


#: event-model's event schema (annotations left out) that `_plain_event` implements.
_EVENT_SCHEMA: Final = {
    "type": "object",
    "allOf": [{"$ref": "#/$defs/PartialEvent"}],
    "$defs": {
        "PartialEvent": {
            "type": "object",
            "properties": {
                "data": {"type": "object", "additionalProperties": True},
                "filled": {
                    "type": "object",
                    "additionalProperties": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
                },
                "time": {"type": "number"},
                "timestamps": {"type": "object", "additionalProperties": True},
            },
            "required": ["data", "time", "timestamps"],
        }
    },
    "properties": {
        "descriptor": {"type": "string"},
        "seq_num": {"type": "integer"},
        "uid": {"type": "string"},
    },
    "required": ["descriptor", "seq_num", "uid"],
    "unevaluatedProperties": False,
}
_EVENT_KEYS: Final = frozenset({"uid", "descriptor", "seq_num", "time", "data", "timestamps", "filled"})
_EVENT_REQUIRED: Final = _EVENT_KEYS - {"filled"}
_NO_FILLED: Final[dict[str, Any]] = {}


def _plain_event(doc: Any) -> bool:
    """True if `doc` is certainly a valid event per `_EVENT_SCHEMA` (False: not known)."""
    if type(doc) is not dict:
        return False
    keys = doc.keys()
    if not _EVENT_REQUIRED <= keys <= _EVENT_KEYS:
        return False
    filled = doc.get("filled", _NO_FILLED)
    return (
        type(doc["uid"]) is str
        and type(doc["descriptor"]) is str
        and type(doc["seq_num"]) is int
        and type(doc["time"]) in (float, int)
        and type(doc["data"]) is dict
        and type(doc["timestamps"]) is dict
        and type(filled) is dict
        and (not filled or all(type(value) in (bool, str) for value in filled.values()))
    )


def _without_annotations(node: Any) -> Any:
    if isinstance(node, list):
        return [_without_annotations(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {key: _without_annotations(value) for key, value in node.items() if key not in _ANNOTATIONS}


class _PlainFirst:
    """A hand-written check that may say "valid", then the compiled one (raises on failure)."""

    def __init__(self, fast_path: Callable[[Any], bool], check: _Check) -> None:
        self.fast_path = fast_path
        self.check = check

    def __call__(self, doc: Any) -> None:
        if not self.fast_path(doc):
            self.check(doc)


def _compile(name: str) -> _Check:
    try:
        kind = DocumentNames(name)
    except ValueError:
        raise ValidationError(Rejection.SCHEMA, f"unknown document kind {name[:40]!r}") from None
    schema = copy.deepcopy(schemas[kind])
    try:
        check = _compile_fast(schema)
    except NotImplementedError as exc:  # a future schema this rewrite does not cover
        log.warning("%s documents are validated by event-model only (slow): %s", name, exc)
        check = schema_validators[kind].validate
    if name == "event" and _without_annotations(schemas[kind]) == _EVENT_SCHEMA:
        check = _PlainFirst(_plain_event, check)
    _fast[name] = check
    return check


def _compile_fast(schema: dict[str, Any]) -> _Check:
    rules = _key_rules(schema)
    replaced: set[int] = set()
    try:
        sites, found = _rule_sites(schema, rules)
        fast_schema = _to_draft7(schema, schema, rules, replaced)
        recursions = {id(body) for ref, body in _rule_bodies(schema, rules)}
        if replaced != found | recursions:
            raise NotImplementedError("a key rule is used where `_rule_sites` does not look")
    except NotImplementedError:
        sites, fast_schema = [], _to_draft7(schema, schema, {}, set())
    check: _Check = fastjsonschema.compile(fast_schema, use_default=False, use_formats=False)
    return _KeyRuleSites(check, sites) if sites else check


def _explain(name: str, doc: dict[str, Any]) -> str | None:
    """event-model's verdict: None if valid, else a short explanation."""
    validator = schema_validators[DocumentNames(name)]
    try:
        errors = list(itertools.islice(validator.iter_errors(doc), 50))
        if not errors:
            return None
        # A failing allOf branch leaves its properties "unevaluated": that error is an echo.
        causes = [error for error in errors if error.validator != "unevaluatedProperties"] or errors
        error = jsonschema.exceptions.best_match(causes)
        path = ascii_text(str(error.json_path), _PATH_CHARS)
        return f"{name} {path}: {ascii_text(str(error.message), _MESSAGE_CHARS - len(path))}"
    except OSError:  # no descriptor, say: the document is not at fault (see `validate_document`)
        raise
    except Exception as exc:  # noqa: BLE001  # event-model could not even look at it (MemoryError too)
        return f"{name}: cannot be checked ({type(exc).__name__})"


def preload() -> None:
    """Compile every kind's checker, and import what explaining a rejection needs, now.

    The daemon calls it at start-up, so that checking a document never opens
    a file: with every descriptor taken, a lazy compile raised OSError and
    valid documents were rejected as ``schema``.
    """
    for kind in DocumentNames:
        if kind.value not in _fast:
            _compile(kind.value)
        _explain(kind.value, {})


def _explain_retrying(name: str, doc: dict[str, Any]) -> str | None:
    """`_explain`, tried again after a pause while the OS refuses it a resource (OSError)."""
    for pause in _OS_RETRY_PAUSES_S:
        try:
            return _explain(name, doc)
        except OSError:
            time.sleep(pause)
    return _explain(name, doc)


def validate_document(name: str, doc: dict[str, Any]) -> None:
    """Raise ``ValidationError(Rejection.SCHEMA, ...)`` unless `doc` is a valid `name` document.

    Whatever `doc` holds, nothing but a ``ValidationError`` leaves: a check
    that fails in an unexpected way (a numpy value compared, memory,
    recursion) rejects the document, except OSError (no descriptor left,
    say: the machine's fault, not the document's), retried, then raised
    (the receiver counts ``internal-error:OSError``, never ``schema``). The detail is ASCII, at most ~200
    characters of the document's content.
    """
    try:
        check = _fast.get(name) or _compile(name)
    except (ValidationError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001  # a schema we cannot compile rejects, never crashes
        raise ValidationError(
            Rejection.SCHEMA, f"{ascii_text(name, 40)}: cannot be checked ({type(exc).__name__})"
        ) from None
    try:
        check(doc)
    except Exception:  # noqa: BLE001  # fast path says no (or choked): event-model decides
        problem = _explain_retrying(name, doc)
        if problem is not None:
            raise ValidationError(Rejection.SCHEMA, problem) from None
