"""Specs: load YAML, apply `key=value` overrides, merge onto the defaults, validate against the action's schema.

Parsing is bounded (MAX_SPEC_BYTES, MAX_SPEC_NODES, MAX_SPEC_DEPTH): a spec comes from users and agents, and a few
lines of YAML aliases ("billion laughs") expand to billions of values, a recursive alias to an endless one, and deep
nesting exhausts Python's stack; each is refused within milliseconds with the limit named.

A spec is a nested mapping (sections model, dataset, train, ... and top-level results_dir, encryption_key,
model_name). Keys are addressed by dotted paths with list indexes: `dataset.train_data_sources[0].json_file`.
Validation reports every problem at once, each with its key path, the bad value and what is allowed.
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import yaml
from jsonschema import Draft202012Validator, ValidationError, validators

from grounding_dino.config import ConfigError, normalize_spec, parse_layers_precision
from grounding_dino.layout import replace_atomically
from sdk import schema_gen
from sdk.errors import MISSING, SpecError, SpecIssue
from sdk.skill_info import ActionInfo, load_skill_info

Token = Union[str, int]
PLACEHOLDER = "???"  # OmegaConf's "required value" marker, found in TAO templates
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_KEY_RE = re.compile(rf"^{_NAME}(\[(\d+|\*)\])*(\.{_NAME}(\[(\d+|\*)\])*)*$")
_TOKEN_RE = re.compile(rf"({_NAME})|\[(\d+|\*)\]")
_KEY_HELP = "use dotted names with optional list indexes, e.g. dataset.train_data_sources[0].json_file"

# A full spec with every section is about 400 values, 5 levels deep and 20 KB; the limits leave room for long lists
# (captions, layer names) while refusing what only a bomb or a generated file gone wrong produces.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000  # values after aliases are expanded
MAX_SPEC_DEPTH = 64
_FLATTER = "a spec's sections nest 4 levels; check the brackets and indentation"


# ---------------------------------------------------------------------------------------------------------------
# YAML


class SpecTooLarge(yaml.YAMLError):
    """A spec past one of the parsing limits; the message names the limit."""


def _too_large(what: str, limit: int, fix: str) -> SpecTooLarge:
    return SpecTooLarge(f"refused: {what}; the limit is {limit:,} (it keeps a spec from exhausting memory or "
                        f"Python's stack); {fix}")


def check_size(root: Any, children, text: str = "the spec") -> None:
    """Raise SpecTooLarge when `root`, with shared parts counted each time they are reached (what walking it, copying
    it or validating it costs), holds more than MAX_SPEC_NODES values, nests deeper than MAX_SPEC_DEPTH, or contains
    itself. `children(node)` lists a node's children, [] for a leaf. Iterative and memoised by identity, so a
    billion-laughs graph of 100 nodes costs 100 steps, not a billion."""
    done: Dict[int, Tuple[int, int]] = {}  # id -> (values, depth) below and including it
    open_ids = set()
    stack: List[Tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        kids = children(node)
        if finished:
            size = 1 + sum(done[id(k)][0] if children(k) else 1 for k in kids)
            depth = 1 + max((done[id(k)][1] if children(k) else 1 for k in kids), default=0)
            open_ids.discard(key)
            done[key] = (size, depth)
            if size > MAX_SPEC_NODES:
                raise _too_large(f"{text} expands to more than {MAX_SPEC_NODES:,} values (YAML aliases repeat what "
                                 "they point to)", MAX_SPEC_NODES,
                                 "write the values out instead of repeating them through aliases")
            if depth > MAX_SPEC_DEPTH:
                raise _too_large(f"{text} nests deeper than {MAX_SPEC_DEPTH} levels", MAX_SPEC_DEPTH, _FLATTER)
        elif key in open_ids:
            raise SpecTooLarge(f"refused: {text} contains itself (a recursive alias, e.g. &a [*a]), so it never ends; "
                               "write the values out")
        elif key not in done and kids:
            open_ids.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids if children(k))


def _node_children(node: yaml.Node) -> list:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _data_children(value: Any) -> list:
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (list, tuple)) else []


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that reads `1e-4` as a float (YAML 1.2; PyYAML alone gives a string), refuses duplicate keys
    (PyYAML alone keeps the last one silently) and refuses documents past MAX_SPEC_NODES / MAX_SPEC_DEPTH before
    anything is built from them."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # The composer recurses once per level: the depth is capped here, before Python's stack gives out.
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_DEPTH:
                raise _too_large(f"the YAML nests deeper than {MAX_SPEC_DEPTH} levels", MAX_SPEC_DEPTH, _FLATTER)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        check_size(node, _node_children, "the YAML")
        return node

    def construct_mapping(self, node, deep=False):
        seen: Dict[str, Any] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        f"in the mapping starting at line {node.start_mark.line + 1}", None,
                        f"duplicate key {key_node.value!r} (first at line {seen[key_node.value].line + 1})",
                        key_node.start_mark,
                    )
                seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def parse_yaml(text: str) -> Any:
    """YAML text -> Python data with the spec rules (safe tags only, 1e-4 is a float, no duplicate keys, the size
    limits: SpecTooLarge)."""
    return yaml.load(text, Loader=_SpecLoader)  # noqa: S506 - _SpecLoader is a yaml.SafeLoader


def load_spec(path_or_mapping: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """A spec as a fresh dict, from a YAML file or a mapping. Raises SpecError naming the file and the problem."""
    if isinstance(path_or_mapping, Mapping):
        where = "<spec>"
        try:
            check_size(path_or_mapping, _data_children)
        except SpecTooLarge as exc:
            raise SpecError.single(where, MISSING, str(exc)) from None
        data = copy.deepcopy(dict(path_or_mapping))
    else:
        path = Path(path_or_mapping)
        where = str(path)
        try:
            with open(path, "rb") as f:  # read at most one byte past the limit: the file may be endless (a FIFO)
                raw = f.read(MAX_SPEC_BYTES + 1)
            if len(raw) > MAX_SPEC_BYTES:
                raise SpecError.single(where, MISSING, f"refused: the spec file is larger than the limit of "
                                                       f"{MAX_SPEC_BYTES:,} bytes for a spec (a spec is a few KB)")
            text = raw.decode("utf-8")
        except FileNotFoundError:
            raise SpecError.single(where, MISSING, "spec file not found; check the path given with -e") from None
        except IsADirectoryError:
            raise SpecError.single(where, MISSING, "is a folder; give the spec's YAML file") from None
        except PermissionError:
            raise SpecError.single(where, MISSING, "cannot read the spec file (permission denied)") from None
        except UnicodeDecodeError as exc:
            raise SpecError.single(where, MISSING, f"not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        try:
            data = parse_yaml(text)
        except SpecTooLarge as exc:
            raise SpecError.single(where, MISSING, str(exc)) from None
        except yaml.YAMLError as exc:
            raise SpecError.single(where, MISSING, f"not valid YAML: {_yaml_error(exc)}") from None
        if data is None:  # an empty file means "all defaults"
            data = {}
    if not isinstance(data, dict):
        raise SpecError.single(
            where, data, f"a spec must be a mapping of sections (model:, dataset:, train:, ...), "
                         f"got {_json_type(data)}"
        )
    bad_keys = [SpecIssue(p, k, "keys must be strings; quote it") for p, k in _non_string_keys(data, "")]
    if bad_keys:
        raise SpecError(bad_keys, header=f"{where}: the spec has keys that are not strings")
    return data


def _non_string_keys(node: Any, prefix: str) -> Iterable[Tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(key, str):
                yield (prefix or "<top level>"), key
            else:
                yield from _non_string_keys(value, f"{prefix}.{key}" if prefix else key)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _non_string_keys(item, f"{prefix}[{i}]")


def dump_spec(spec: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write `spec` as YAML (key order kept) atomically: readers never see a half-written file."""
    replace_atomically(path, schema_gen.yaml_text(dict(spec)))


# ---------------------------------------------------------------------------------------------------------------
# key paths


def parse_key(dotted: str, *, wildcard: bool = False) -> List[Token]:
    """`a.b[0].c` -> ["a", "b", 0, "c"]. `[*]` (every item) is allowed only with `wildcard`."""
    if not isinstance(dotted, str) or not _KEY_RE.match(dotted) or (not wildcard and "[*]" in dotted):
        raise SpecError.single(str(dotted), MISSING, f"malformed key; {_KEY_HELP}")
    return [name if name else (index if index == "*" else int(index)) for name, index in _TOKEN_RE.findall(dotted)]


def format_key(tokens: Sequence[Token]) -> str:
    out = ""
    for token in tokens:
        out += f"[{token}]" if isinstance(token, int) or token == "*" else (f".{token}" if out else token)
    return out


def get_path(spec: Any, dotted: str, default: Any = MISSING) -> Any:
    """The value at `dotted`; `default` when absent, or KeyError naming the key when no default is given."""
    node = spec
    for token in parse_key(dotted):
        if isinstance(token, int):
            found = isinstance(node, list) and token < len(node)
        else:
            found = isinstance(node, dict) and token in node
        if not found:
            if default is MISSING:
                raise KeyError(dotted)
            return default
        node = node[token]
    return node


def set_path(spec: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set `dotted` in place, creating missing sections. A list index may be at most the list's length (that
    appends one item); anything further raises SpecError naming the index."""
    tokens = parse_key(dotted)
    node: Any = spec
    for depth, token in enumerate(tokens):
        last = depth == len(tokens) - 1
        here = format_key(tokens[:depth]) or "<spec>"
        fresh: Any = value if last else ([] if isinstance(tokens[depth + 1], int) else {})
        if isinstance(token, int):
            if not isinstance(node, list):
                raise SpecError.single(here, node, f"is {_json_type(node)}, not a list, so [{token}] cannot index it")
            if token > len(node):
                raise SpecError.single(
                    format_key(tokens[: depth + 1]), MISSING,
                    f"list index {token} is beyond the end of {here} (length {len(node)}); "
                    f"the next item to add is {here}[{len(node)}]",
                )
            if token == len(node):
                node.append(fresh)
            elif last:
                node[token] = value
        else:
            if not isinstance(node, dict):
                raise SpecError.single(here, node, f"is {_json_type(node)}, not a section, so it has no key {token!r}")
            if last:
                node[token] = value
            elif node.get(token) is None:
                node[token] = fresh
            elif not isinstance(node[token], (dict, list)):
                where = format_key(tokens[: depth + 1])
                raise SpecError.single(where, node[token], f"is {_json_type(node[token])}, not a section or list, "
                                                           f"so {dotted} cannot be set inside it")
        if not last:
            node = node[token]


# ---------------------------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> Tuple[str, Any]:
    """`"a.b[0].c=3"` -> `("a.b[0].c", 3)`; the value is read with YAML scalar rules (3, 1e-4, true, null, [1,2])."""
    if not isinstance(text, str) or "=" not in text:
        raise SpecError.single(str(text), MISSING, "malformed override: expected key=value, e.g. train.num_epochs=3")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise SpecError.single(text, MISSING, "malformed override: the key before '=' is empty")
    parse_key(key)
    if not raw.strip():
        raise SpecError.single(key, MISSING, "override has no value; write key=null for null or key=\"\" for an "
                                             "empty string")
    try:
        value = parse_yaml(raw)
    except SpecTooLarge as exc:
        raise SpecError.single(key, MISSING, f"override value {exc}") from None
    except yaml.YAMLError as exc:
        raise SpecError.single(key, raw, f"override value is not valid YAML ({_yaml_error(exc)}); quote strings "
                                         "that contain ': ' or start with [, {, * or &") from None
    return key, value


def apply_overrides(spec: Mapping[str, Any], overrides: Union[Mapping[str, Any], Sequence[str], None],
                    shorthand: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """A new spec with `overrides` set: a mapping of dotted key -> value (values used as given), or `key=value`
    strings (values parsed). Keys found in `shorthand` (e.g. num_epochs) are replaced by their full path.
    Every malformed override is reported together."""
    result = copy.deepcopy(dict(spec))
    if not overrides:
        return result
    if isinstance(overrides, str):
        raise TypeError("overrides must be a mapping or a list of 'key=value' strings, not one string")
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    issues: List[SpecIssue] = []
    for item in items:
        try:
            key, value = item if isinstance(overrides, Mapping) else parse_override(item)
            try:
                check_size(value, _data_children, "the value")
            except SpecTooLarge as exc:
                raise SpecError.single(key, MISSING, str(exc)) from None
            set_path(result, (shorthand or {}).get(key, key), value)
        except SpecError as exc:
            issues.extend(exc.issues)
    if issues:
        raise SpecError(issues, header=f"{len(issues)} override{'s are' if len(issues) > 1 else ' is'} invalid")
    return result


# ---------------------------------------------------------------------------------------------------------------
# defaults


def _merge(base: Any, update: Any) -> Any:
    """`update` onto `base`: mappings merge key by key; anything else replaces. A null section keeps the defaults
    (an empty `evaluate:` in YAML means "no changes")."""
    if isinstance(base, dict) and update is None:
        return copy.deepcopy(base)
    if isinstance(base, dict) and isinstance(update, dict):
        merged = copy.deepcopy(base)
        for key, value in update.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    return copy.deepcopy(update)


def _fill_defaults(schema: Mapping[str, Any], value: Any, in_item: bool = False) -> Any:
    """Add the schema's defaults for keys missing inside list items, in place (the sections themselves get their
    defaults from the default spec; a list item such as a train data source has no default of its own)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name in value:
                _fill_defaults(sub, value[name], in_item)
            elif in_item and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _fill_defaults(schema["items"], item, in_item=True)
    return value


def resolve_spec(action: str, spec: Union[str, os.PathLike, Mapping[str, Any], None] = None,
                 overrides: Union[Mapping[str, Any], Sequence[str], None] = None) -> Dict[str, Any]:
    """The action's runtime defaults, with `spec` merged on top, then `overrides` (shorthand keys allowed), in our
    spellings (config.normalize_spec: `data_type: fp32` reads as FP32, `model_name: null` as grounding_dino).
    Sections of other actions in `spec` are kept as given (a full TAO experiment spec runs any action)."""
    info = load_skill_info()
    info.action(action)
    merged = _merge(schema_gen.action_default(action), load_spec(spec) if spec is not None else {})
    schema = _validation_schema(action)
    merged = apply_overrides(_fill_defaults(schema, merged), overrides, info.shorthand)
    return _fill_defaults(schema, normalize_spec(merged))


# ---------------------------------------------------------------------------------------------------------------
# validation


@lru_cache(maxsize=None)
def _validation_schema(action: str) -> Dict[str, Any]:
    """The action's generated schema, plus the other sections of the experiment, checked the same way."""
    schema = copy.deepcopy(schema_gen.action_schema(action))
    for name, sub in schema_gen.experiment_schema()["properties"].items():
        schema["properties"].setdefault(name, sub)
    return schema


_BOUNDS = ("minimum", "maximum", "exclusiveMinimum")


def _is_integer(_checker, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# JSON Schema counts 1e10 (a float with no fraction) as an integer; the runtime would get a float where it sizes
# tensors and loops, so integer keys take integers only.
_StrictValidator = validators.extend(
    Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


@lru_cache(maxsize=None)
def _validator(action: str) -> Draft202012Validator:
    return _StrictValidator(_validation_schema(action))


def validate(spec: Mapping[str, Any], action: str, filled_by_mappings: Iterable[str] = frozenset()) -> None:
    """Raise SpecError listing every problem of `spec` for `action`: schema violations, `???` placeholders,
    inconsistent keys, and required inputs that are missing. Keys in `filled_by_mappings` (set later by mapping
    functions or data sources) count as present."""
    info = load_skill_info()
    act = info.action(action)
    filled = frozenset(filled_by_mappings)
    issues: List[SpecIssue] = _non_finite(spec, _validation_schema(action), [])
    errors = list(_validator(action).iter_errors(spec))
    mistyped = {tuple(e.absolute_path) for e in errors if e.validator == "type"}  # its range is in the type message
    for error in errors:
        if _is_non_finite(error.instance):  # said once, by _non_finite
            continue
        if error.validator in _BOUNDS and tuple(error.absolute_path) in mistyped:
            continue
        issues.extend(_schema_issues(error, info.shorthand))
    issues.extend(_placeholders(spec, ""))
    issues.extend(_consistency(spec))
    issues.extend(_missing_inputs(spec, act, filled))
    issues.extend(_missing_results_dir(spec, action, filled))
    if issues:
        unique = {(i.path, i.message): i for i in issues}
        raise SpecError(sorted(unique.values(), key=lambda i: (i.path, i.message)),
                        header=f"the {action} spec has {len(unique)} problem{'s' if len(unique) > 1 else ''}")


_JSON_TYPES = ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))


def _json_type(value: Any) -> str:
    for kind, name in _JSON_TYPES:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _allowed_types(expected: Any) -> str:
    names = expected if isinstance(expected, list) else [expected]
    words = {"array": "a list", "object": "a section (mapping)", "null": "null", "integer": "an integer",
             "number": "a number", "string": "a string", "boolean": "true or false"}
    return " or ".join(words.get(n, n) for n in names)


def _schema_issues(error: ValidationError, shorthand: Mapping[str, str]) -> List[SpecIssue]:
    path = list(error.absolute_path)
    where = format_key(path)
    kind, bound = error.validator, error.validator_value
    if kind == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        issues = []
        for key in sorted(set(error.instance) - set(allowed)):
            parts = ["unknown key"]
            close = difflib.get_close_matches(key, allowed, n=1)
            if not path and key in shorthand:
                parts.append(f"did you mean {shorthand[key]}? (short names work only as overrides)")
            elif close:
                parts.append(f"did you mean {close[0]!r}?")
            parts.append(f"allowed keys here: {', '.join(allowed)}")
            issues.append(SpecIssue(format_key(path + [key]), error.instance[key], "; ".join(parts)))
        return issues
    if kind == "type":
        limits = _allowed_range(error.schema)
        message = f"expected {_allowed_types(bound)}{' ' + limits if limits else ''}, got {_json_type(error.instance)}"
    elif kind == "enum":
        message = "must be one of: " + ", ".join("null" if v is None else str(v) for v in bound)
    elif kind in _BOUNDS:
        message = f"out of range: must be {_allowed_range(error.schema)}"
    elif kind in ("minItems", "maxItems"):
        count = len(error.instance)
        message = f"has {count} item{'' if count == 1 else 's'}; {_allowed_items(error.schema)}"
    else:
        message = error.message
    return [SpecIssue(where, error.instance, message)]


def _allowed_range(schema: Mapping[str, Any]) -> str:
    """'between 1 and 5000', '> 0 and <= 1', '>= 0', or '' for a schema without bounds."""
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"between {low} and {high}"
    parts = [f">= {low}"] if low is not None else []
    if schema.get("exclusiveMinimum") is not None:
        parts.append(f"> {schema['exclusiveMinimum']}")
    if high is not None:
        parts.append(f"<= {high}")
    return " and ".join(parts)


def _allowed_items(schema: Mapping[str, Any]) -> str:
    low, high = schema.get("minItems"), schema.get("maxItems")
    if low is not None and high is not None:
        count = f"exactly {low}" if low == high else f"{low} to {high}"
    else:
        count = f"at least {low}" if low is not None else f"at most {high}"
    items = _allowed_range(schema.get("items") or {})
    return f"allowed: {count} items" + (f", each {items}" if items else "")


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _schema_at(schema: Mapping[str, Any], token: Token) -> Mapping[str, Any]:
    if isinstance(token, int):
        return schema.get("items") or {}
    extra = schema.get("additionalProperties")
    return schema.get("properties", {}).get(token) or (extra if isinstance(extra, dict) else {})


def _non_finite(node: Any, schema: Mapping[str, Any], tokens: List[Token]) -> List[SpecIssue]:
    """NaN and infinity anywhere in the spec. JSON Schema has no way to refuse them (NaN passes every comparison,
    infinity every minimum), so they are found here, with the key's allowed range."""
    if _is_non_finite(node):
        limits = _allowed_range(schema)
        kind = "an integer" if schema.get("type") in ("integer", ["integer", "null"]) else "a finite number"
        return [SpecIssue(format_key(tokens), node, f"must be {kind}{' ' + limits if limits else ''}; NaN and "
                                                    "infinity are not allowed (JSON Schema cannot express that, so "
                                                    "the validator checks it)")]
    if isinstance(node, dict):
        return [i for k, v in node.items() if isinstance(k, str)
                for i in _non_finite(v, _schema_at(schema, k), tokens + [k])]
    if isinstance(node, list):
        return [i for n, v in enumerate(node) for i in _non_finite(v, _schema_at(schema, n), tokens + [n])]
    return []


def _placeholders(node: Any, prefix: str) -> List[SpecIssue]:
    if node == PLACEHOLDER:
        return [SpecIssue(prefix, node, "required value not filled in ('???' placeholder); set it")]
    if isinstance(node, dict):
        return [i for k, v in node.items() if isinstance(k, str)
                for i in _placeholders(v, f"{prefix}.{k}" if prefix else k)]
    if isinstance(node, list):
        return [i for n, v in enumerate(node) for i in _placeholders(v, f"{prefix}[{n}]")]
    return []


def _number(spec: Mapping[str, Any], key: str) -> Optional[float]:
    value = get_path(spec, key, None)
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _consistency(spec: Mapping[str, Any]) -> List[SpecIssue]:
    """Rules that tie keys together (each key alone may be in range)."""
    issues = []
    levels = _number(spec, "model.num_feature_levels")
    indices = get_path(spec, "model.return_interm_indices", None)
    if levels is not None and isinstance(indices, list) and len(indices) != levels:
        issues.append(SpecIssue("model.return_interm_indices", indices,
                                f"needs one entry per feature level: model.num_feature_levels is {levels}, "
                                f"this list has {len(indices)}; change one to match the other"))
    low = _number(spec, "dataset.augmentation.train_random_crop_min")
    high = _number(spec, "dataset.augmentation.train_random_crop_max")
    if low is not None and high is not None and low > high:
        issues.append(SpecIssue("dataset.augmentation.train_random_crop_min", low,
                                f"must be <= dataset.augmentation.train_random_crop_max ({high})"))
    layers_precision = get_path(spec, "gen_trt_engine.tensorrt.layers_precision", None)
    if isinstance(layers_precision, list) and all(isinstance(e, str) for e in layers_precision):  # else: type error
        try:
            parse_layers_precision(layers_precision)
        except ConfigError as exc:
            issues.append(SpecIssue(exc.path, get_path(spec, exc.path, MISSING), exc.message))
    batches = [_number(spec, f"gen_trt_engine.tensorrt.{k}_batch_size") for k in ("min", "opt", "max")]
    if None not in batches and not batches[0] <= batches[1] <= batches[2]:
        issues.append(SpecIssue("gen_trt_engine.tensorrt.opt_batch_size", batches[1],
                                f"the TensorRT profile needs min_batch_size <= opt_batch_size <= max_batch_size, "
                                f"got {batches[0]} / {batches[1]} / {batches[2]}"))
    return issues


def expand_key(spec: Any, pattern: str) -> List[Tuple[str, Any]]:
    """Concrete (key, value) pairs for a key pattern whose `[*]` means every list item; MISSING when absent."""
    results: List[Tuple[List[Token], Any]] = [([], spec)]
    for token in parse_key(pattern, wildcard=True):
        step = []
        for tokens, node in results:
            if token == "*":
                items = node if isinstance(node, list) else []
                step.extend((tokens + [i], item) for i, item in enumerate(items))
            elif isinstance(token, int):
                ok = isinstance(node, list) and token < len(node)
                step.append((tokens + [token], node[token] if ok else MISSING))
            else:
                ok = isinstance(node, dict) and token in node
                step.append((tokens + [token], node[token] if ok else MISSING))
        results = step
    return [(format_key(tokens), value) for tokens, value in results]


def _is_set(value: Any) -> bool:
    return value is not MISSING and value is not None and value != "" and value != []


def _covered(pattern: str, filled: frozenset) -> bool:
    """True when `pattern` or a section above it is filled later (by a mapping function or a data source)."""
    tokens = parse_key(pattern, wildcard=True)
    return any(format_key(tokens[:n]) in filled or format_key([t for t in tokens[:n] if t != "*"]) in filled
               for n in range(1, len(tokens) + 1))


def _source_of(act: ActionInfo, pattern: str) -> Optional[str]:
    """'role, file' of the data source that supplies `pattern`, if any."""
    plain = pattern.replace("[*]", "")
    for key, source in act.data_sources.items():
        if plain == key:
            return f"{source.source}" + (f" dataset, {source.file.file}" if source.file is not None else "")
        for name, sub in source.fields.items():
            if plain == f"{key}.{name}":
                return f"{source.source} dataset, {sub.file}"
    return None


def _missing_message(act: ActionInfo, pattern: str, key: str, kind: str) -> str:
    source = _source_of(act, pattern)
    what = f"missing required data source ({source})" if source else "missing required input"
    example = {"file": "/path/to/file", "folder": "/path/to/folder", "list": "[...]",
               "model": "/path/to/model.pth"}[kind]
    return f"{what}: the {act.name} action needs this {kind}; set it in the spec or override {key}={example}"


def _missing_inputs(spec: Mapping[str, Any], act: ActionInfo, filled: frozenset) -> List[SpecIssue]:
    issues = []
    groups: Dict[str, List[str]] = {}
    for pattern, item in act.inputs.items():
        if any(get_path(spec, k, MISSING) != v for k, v in item.required_if.items()):
            continue
        if item.any_of:
            groups.setdefault(item.any_of, []).append(pattern)
            continue
        if item.optional or _covered(pattern, filled):
            continue
        for key, value in expand_key(spec, pattern):
            if not _is_set(value):
                issues.append(SpecIssue(key, value, _missing_message(act, pattern, key, item.type)))
    for members in groups.values():
        if any(_covered(m, filled) or any(_is_set(v) for _, v in expand_key(spec, m)) for m in members):
            continue
        issues.append(SpecIssue(members[0], get_path(spec, members[0], MISSING),
                                f"missing required input: the {act.name} action needs one of "
                                f"{', '.join(members)}; set one in the spec or as an override"))
    return issues


def _missing_results_dir(spec: Mapping[str, Any], action: str, filled: frozenset) -> List[SpecIssue]:
    if "results_dir" in filled or _is_set(get_path(spec, "results_dir", None)):
        return []
    if _is_set(get_path(spec, f"{action}.results_dir", None)):
        return []
    return [SpecIssue("results_dir", get_path(spec, "results_dir", MISSING),
                      f"no results folder: set results_dir (the {action} results go to <results_dir>/{action}) "
                      f"or {action}.results_dir, e.g. override results_dir=/path/to/results")]
