"""Generate per-action JSON Schemas, the manifest and spec templates from grounding_dino/config.py.

The schema of a key is read off its dataclass field: the type hint gives the JSON type, `param(...)` metadata gives
description, bounds, enum, popularity, AutoML search metadata (`x-automl`) and the structural mark
(`x-structural`: a checkpoint only loads into a model built with the same value), and the dataclass default gives
`default`. Output is deterministic (sorted keys, fixed float formatting, final newline), so regenerating an unchanged
config rewrites identical bytes and `check` can compare files byte for byte.

    python -m sdk.schema_gen generate     # after editing grounding_dino/config.py
    python -m sdk.schema_gen check        # exit 1 and name every stale or missing file
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Tuple

import yaml

from grounding_dino import config as gd_config
from sdk.skill_info import BANK_ROOT, SkillInfo, load_skill_info

MODEL = "grounding_dino"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
TOP_LEVEL_KEYS = ("results_dir", "encryption_key", "model_name")
_SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}


# ---------------------------------------------------------------------------------------------------------------
# dataclass -> JSON Schema


def _type_schema(hint: Any) -> Dict[str, Any]:
    """JSON Schema of a type hint: scalars, Optional, List, Dict[str, X], Any and nested dataclasses."""
    if hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        members = [a for a in args if a is not type(None)]
        if len(members) != 1 or len(args) != 2:
            raise TypeError(f"only Optional[X] unions are supported, got {hint}")
        schema = _type_schema(members[0])
        schema["type"] = [schema["type"], "null"]
        return schema
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if dataclasses.is_dataclass(hint):
        return _object_schema(hint)
    raise TypeError(f"no JSON Schema for type {hint}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return dataclasses.asdict(f.default_factory()) if f.metadata.get("section") else f.default_factory()


def _field_schema(f: dataclasses.Field, hint: Any) -> Dict[str, Any]:
    meta = f.metadata
    schema = _type_schema(hint)
    if meta.get("description"):
        schema["description"] = meta["description"]
    if meta.get("section"):
        return schema
    schema["default"] = _field_default(f)
    if meta.get("display_name"):
        schema["title"] = meta["display_name"]
    for key, keyword in (("minimum", "minimum"), ("maximum", "maximum"), ("exclusive_minimum", "exclusiveMinimum"),
                         ("min_items", "minItems"), ("max_items", "maxItems")):
        if meta.get(key) is not None:
            schema[keyword] = meta[key]
    for key, keyword in (("item_minimum", "minimum"), ("item_maximum", "maximum"),
                         ("item_exclusive_minimum", "exclusiveMinimum")):
        if meta.get(key) is not None:
            schema["items"][keyword] = meta[key]
    if meta.get("options") is not None:
        nullable = isinstance(schema["type"], list)
        schema["enum"] = list(meta["options"]) + ([None] if nullable else [])
        if any(isinstance(o, str) and o.lower() != o.upper() for o in meta["options"]):
            # Specs are normalised before validation (config.normalize_spec); a tool validating a raw spec against
            # this schema alone needs to know.
            schema["description"] += " Any letter case is accepted and read as the value listed."
            schema["x-case-insensitive"] = True
    if meta.get("popular"):
        schema["x-popular"] = True
    if meta.get("automl") is not None:
        schema["x-automl"] = {**meta["automl"].to_schema(), "popular": bool(meta.get("popular"))}
    if meta.get("structural"):
        schema["x-structural"] = True
    if meta.get("inherited"):
        schema["x-inherited"] = True
    if meta.get("no_effect"):
        schema["description"] += " Has no effect here (a warning says so when it is set)."
        schema["x-no-effect"] = True
    return schema


def _object_schema(cls: type) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties = {f.name: _field_schema(f, hints[f.name]) for f in dataclasses.fields(cls)}
    schema = {"type": "object", "additionalProperties": False, "properties": properties}
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring
        schema["description"] = doc.splitlines()[0]
    return schema


@lru_cache(maxsize=1)
def _experiment_schema() -> Dict[str, Any]:
    return _object_schema(gd_config.ExperimentConfig)


def experiment_schema() -> Dict[str, Any]:
    """The schema of every section (all actions together); a fresh copy."""
    return copy.deepcopy(_experiment_schema())


def _leaves(schema: Dict[str, Any], prefix: str = "") -> List[Tuple[str, Dict[str, Any]]]:
    """(dotted key, schema) of every leaf under an object schema, sections expanded."""
    out = []
    for name, sub in schema.get("properties", {}).items():
        key = f"{prefix}{name}"
        if sub.get("type") == "object" and "properties" in sub:
            out.extend(_leaves(sub, key + "."))
        else:
            out.append((key, sub))
    return out


def automl_parameters(schema: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(searched by default, searchable only on request): keys with `x-automl`, split by `enabled`."""
    leaves = [(key, sub["x-automl"]) for key, sub in _leaves(schema) if "x-automl" in sub]
    return (sorted(k for k, a in leaves if a["enabled"]), sorted(k for k, a in leaves if not a["enabled"]))


def popular_parameters(schema: Dict[str, Any]) -> List[str]:
    return sorted(key for key, sub in _leaves(schema) if sub.get("x-popular"))


def action_sections(action: str) -> Tuple[str, ...]:
    if action not in gd_config.ACTION_SECTIONS:
        raise ValueError(f"unknown action {action!r}; choose one of: {', '.join(gd_config.ACTIONS)}")
    return TOP_LEVEL_KEYS + tuple(gd_config.ACTION_SECTIONS[action])


def action_default(action: str) -> Dict[str, Any]:
    """The runtime default spec restricted to the action's keys, in config.py's field order."""
    full = gd_config.default_spec()
    return {key: full[key] for key in full if key in action_sections(action)}


def build_action_schema(action: str) -> Dict[str, Any]:
    full = experiment_schema()
    sections = action_sections(action)
    schema = {
        "$schema": DRAFT,
        "title": f"Grounding DINO {action} spec",
        "description": (
            f"Spec of the `{action}` action (`grounding_dino {action} -e spec.yaml`). Generated from "
            "grounding_dino/config.py by sdk/schema_gen.py; do not edit."
        ),
        "type": "object",
        "additionalProperties": False,
        "properties": {key: full["properties"][key] for key in sections},
        "default": action_default(action),
        "x-model": MODEL,
        "x-action": action,
        "x-source": "grounding_dino.config.ExperimentConfig",
    }
    if action == "train":
        enabled, disabled = automl_parameters(schema)
        schema["automl_default_parameters"] = enabled
        schema["automl_disabled_parameters"] = disabled
    return schema


def action_schema(action: str) -> Dict[str, Any]:
    """The action's schema from its generated file, or built in memory when the file is absent."""
    path = BANK_ROOT / "schemas" / MODEL / f"{action}.schema.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    return build_action_schema(action)


# ---------------------------------------------------------------------------------------------------------------
# rendering


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False) + "\n"


class _SpecDumper(yaml.SafeDumper):
    """Block style for sections, flow style for lists of scalars (`scales: [480, 512]`)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(not isinstance(item, (dict, list)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_SpecDumper.add_representer(list, _represent_list)


def yaml_text(data: Dict[str, Any], header: str = "") -> str:
    body = yaml.dump(data, Dumper=_SpecDumper, sort_keys=False, default_flow_style=False, width=120,
                     allow_unicode=True)
    return header + body


def _select(data: Dict[str, Any], keys: Tuple[str, ...]) -> Dict[str, Any]:
    """The parts of `data` named by dotted keys, keeping `data`'s key order."""
    wanted: Dict[str, List[str]] = {}
    for key in keys:
        head, _, rest = key.partition(".")
        if head not in data or (rest and not isinstance(data[head], dict)):
            raise KeyError(key)
        wanted.setdefault(head, []).append(rest)
    out = {}
    for head in data:
        if head in wanted:
            rests = wanted[head]
            whole = "" in rests
            out[head] = copy.deepcopy(data[head]) if whole else _select(data[head], tuple(rests))
    return out


def _template_header(action: str, deploy: bool) -> str:
    kind = "TensorRT deploy " if deploy else ""
    return (
        f"# Grounding DINO {kind}{action} spec: every value is the runtime default.\n"
        "# Generated from grounding_dino/config.py by `skillbank schemas generate`; do not edit.\n"
        f"# Run: grounding_dino {action} -e this.yaml key=value ...\n"
    )


def render(info: SkillInfo) -> Dict[Path, str]:
    """Every generated file of the model family: path -> exact text."""
    files: Dict[Path, str] = {}
    manifest: Dict[str, Any] = {
        "model": MODEL,
        "skill": info.name,
        "source": "grounding_dino/config.py",
        "generator": "sdk/schema_gen.py",
        "actions": {},
    }
    for action in gd_config.ACTIONS:
        act = info.action(action)
        schema = build_action_schema(action)
        files[act.schema] = json_text(schema)
        files[act.template] = yaml_text(schema["default"], _template_header(action, deploy=False))
        automl = info.automl_enabled and action == "train"
        enabled, disabled = automl_parameters(schema) if automl else ([], [])
        entry = {
            "schema": act.schema.relative_to(info.root).as_posix(),
            "template": act.template.relative_to(info.root).as_posix(),
            "command": act.command,
            "sections": list(action_sections(action)),
            "automl_enabled": automl,
            "automl_default_parameters": enabled,
            "automl_disabled_parameters": disabled,
            "popular_parameters": popular_parameters(schema),
        }
        if act.deploy is not None:
            try:
                deploy_default = _select(schema["default"], act.deploy.keys)
            except KeyError as exc:
                raise ValueError(f"{info.path}: deploy.{action}.keys: {exc.args[0]!r} is not a {action} spec key")
            files[act.deploy.template] = yaml_text(deploy_default, _template_header(action, deploy=True))
            entry["deploy_template"] = act.deploy.template.relative_to(info.root).as_posix()
        manifest["actions"][action] = entry
    files[info.schema_dir / "manifest.json"] = json_text(manifest)
    return files


def _stale_candidates(info: SkillInfo) -> List[Path]:
    """Files that look generated (by name) in the generated folders."""
    found = list(info.schema_dir.glob("*.schema.json")) if info.schema_dir.is_dir() else []
    found += list(info.references_dir.glob("spec_template_*.yaml"))
    return found


def generate(root: Path | str = BANK_ROOT) -> List[Path]:
    """Write every generated file under `root` (and remove generated-looking files no action owns)."""
    info = load_skill_info(MODEL, root)
    files = render(info)
    for path in _stale_candidates(info):
        if path not in files:
            path.unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return sorted(files)


def check(root: Path | str = BANK_ROOT) -> List[str]:
    """Problems with the generated files under `root` (empty = fresh)."""
    info = load_skill_info(MODEL, root)
    files = render(info)
    problems = []
    for path, text in sorted(files.items()):
        rel = path.relative_to(info.root).as_posix()
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{rel}: stale (differs from grounding_dino/config.py)")
    for path in sorted(set(_stale_candidates(info)) - set(files)):
        problems.append(f"{path.relative_to(info.root).as_posix()}: not generated by any action (remove it)")
    return problems


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdk.schema_gen", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("generate", "check"))
    parser.add_argument("--root", type=Path, default=BANK_ROOT,
                        help="folder holding references/ and schemas/ (default: the one the code reads)")
    args = parser.parse_args(argv)
    if args.command == "generate":
        for path in generate(args.root):
            print(path.relative_to(args.root.resolve()).as_posix())
        return 0
    problems = check(args.root)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("run `skillbank schemas generate` and commit the result", file=sys.stderr)
        return 1
    print("schemas and templates are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
