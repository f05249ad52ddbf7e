"""The action contract of a model family, read from `references/<model>/skill_info.yaml`.

The file is hand-written and is the one place that says, per action, which command runs, which spec keys are inputs
and outputs, which dataset roles supply which keys, and which mapping functions fill which keys. This module only
parses it into typed objects and rejects a malformed file with the key path of the problem.
"""
from __future__ import annotations

import importlib.resources
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from sdk.errors import SkillBankError

# The folder holding skills/, schemas/, references/ and examples/: one lookup for a checkout, where the package's
# entries link to the repository's folders, and for an installed wheel, where they are copies.
BANK_ROOT = Path(importlib.resources.files("grounding_dino_skillbank"))
INPUT_TYPES = ("file", "folder", "list", "model")  # model: a local file or folder, or a Hugging Face id
RUNTIMES = (None, "extracted_folder")


@dataclass(frozen=True)
class InputInfo:
    """A spec key an action reads. Required unless `optional`; an `any_of` group needs one member set."""

    key: str
    type: str
    optional: bool = False
    any_of: Optional[str] = None
    required_if: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceFile:
    """A file inside a dataset; `runtime == "extracted_folder"` means it is an archive to unpack."""

    file: str
    runtime: Optional[str] = None
    optional: bool = False


@dataclass(frozen=True)
class DataSource:
    """Spec key `key` is filled from the datasets of role `source`.

    A leaf key has `file`; a section (or a list of sections when `list`) has `fields` (field name -> SourceFile).
    `list` means one entry (list item, or list element for a leaf) per dataset of the role.
    """

    key: str
    source: str
    list: bool = False
    file: Optional[SourceFile] = None
    fields: Mapping[str, SourceFile] = field(default_factory=dict)


@dataclass(frozen=True)
class DeployInfo:
    """The TensorRT variant of an action: its template, the keys it keeps, and its mapping functions."""

    template: Path
    keys: Tuple[str, ...]
    spec_params: Mapping[str, str]


@dataclass(frozen=True)
class ActionInfo:
    name: str
    command: str
    inputs: Mapping[str, InputInfo]
    outputs: Mapping[str, Mapping[str, Any]]
    data_sources: Mapping[str, DataSource]
    spec_params: Mapping[str, str]
    template: Path
    schema: Path
    deploy: Optional[DeployInfo] = None

    def command_for(self, config_path: str | Path) -> str:
        return self.command.format(config_path=config_path)


@dataclass(frozen=True)
class SkillInfo:
    name: str
    network_arch: str
    automl_enabled: bool
    data_format: str
    description: str
    gpu_spec_key: Optional[str]
    actions: Mapping[str, ActionInfo]
    shorthand: Mapping[str, str]
    path: Path
    root: Path
    raw: Mapping[str, Any]

    @property
    def schema_dir(self) -> Path:
        return self.root / "schemas" / self.network_arch

    @property
    def references_dir(self) -> Path:
        return self.path.parent

    @property
    def data_sources(self) -> Dict[str, Mapping[str, DataSource]]:
        return {name: action.data_sources for name, action in self.actions.items()}

    @property
    def spec_params(self) -> Dict[str, Mapping[str, str]]:
        return {name: action.spec_params for name, action in self.actions.items()}

    @property
    def templates(self) -> Dict[str, Path]:
        return {name: action.template for name, action in self.actions.items()}

    def action(self, name: str) -> ActionInfo:
        if name not in self.actions:
            raise SkillBankError(
                f"unknown action {name!r} for {self.network_arch}; choose one of: {', '.join(self.actions)}"
            )
        return self.actions[name]


def load_skill_info(model: str = "grounding_dino", root: Path | str | None = None) -> SkillInfo:
    """Parse `<root>/references/<model>/skill_info.yaml` (root: BANK_ROOT by default)."""
    return _load(model, Path(root).resolve() if root is not None else BANK_ROOT)


@lru_cache(maxsize=8)
def _load(model: str, root: Path) -> SkillInfo:
    path = root / "references" / model / "skill_info.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SkillBankError(f"cannot read the skill contract {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise SkillBankError(f"{path}: not valid YAML: {exc}") from exc
    return _Parser(path, root).skill(raw)


class _Parser:
    """Builds the typed contract; every complaint names the file and the key path inside it."""

    def __init__(self, path: Path, root: Path):
        self.path = path
        self.root = root

    def fail(self, where: str, message: str) -> SkillBankError:
        return SkillBankError(f"{self.path}: {where}: {message}")

    def mapping(self, value: Any, where: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        return value

    def required(self, data: Mapping[str, Any], key: str, where: str, kind: type = str) -> Any:
        value = data.get(key)
        if not isinstance(value, kind):
            raise self.fail(f"{where}.{key}" if where else key, f"required {kind.__name__} is missing or malformed")
        return value

    def skill(self, raw: Any) -> SkillInfo:
        raw = self.mapping(raw, "<top level>")
        network_arch = self.required(raw, "network_arch", "")
        references = self.path.parent
        actions_raw = self.mapping(raw.get("actions"), "actions")
        templates = self.mapping(raw.get("spec_templates"), "spec_templates")
        deploy_raw = self.mapping(raw.get("deploy"), "deploy")
        unknown = sorted(set(deploy_raw) - set(actions_raw))
        if unknown:
            raise self.fail(f"deploy.{unknown[0]}", "not an action declared under actions")
        actions = {}
        for name, body in actions_raw.items():
            where = f"actions.{name}"
            body = self.mapping(body, where)
            deploy = self.deploy(deploy_raw[name], f"deploy.{name}", references) if name in deploy_raw else None
            actions[name] = ActionInfo(
                name=name,
                command=self.required(body, "command", where),
                inputs=self.inputs(body.get("inputs"), f"{where}.inputs"),
                outputs=self.mapping(body.get("outputs"), f"{where}.outputs"),
                data_sources=self.data_sources(
                    self.mapping(raw.get("data_sources"), "data_sources").get(name), f"data_sources.{name}"
                ),
                spec_params=self.strings(self.mapping(raw.get("spec_params"), "spec_params").get(name),
                                         f"spec_params.{name}"),
                template=references / self.required(templates, name, "spec_templates"),
                schema=self.root / "schemas" / network_arch / f"{name}.schema.json",
                deploy=deploy,
            )
        return SkillInfo(
            name=self.required(raw, "name", ""),
            network_arch=network_arch,
            automl_enabled=bool(raw.get("automl_enabled", False)),
            data_format=str(raw.get("data_format", "")),
            description=str(raw.get("description", "")),
            gpu_spec_key=raw.get("gpu_spec_key"),
            actions=actions,
            shorthand=self.strings(raw.get("spec_shorthand_keys"), "spec_shorthand_keys"),
            path=self.path,
            root=self.root,
            raw=raw,
        )

    def strings(self, value: Any, where: str) -> Dict[str, str]:
        value = self.mapping(value, where)
        for key, item in value.items():
            if not isinstance(item, str):
                raise self.fail(f"{where}.{key}", f"expected a string, got {item!r}")
        return dict(value)

    def inputs(self, value: Any, where: str) -> Dict[str, InputInfo]:
        out = {}
        for key, body in self.mapping(value, where).items():
            body = self.mapping(body, f"{where}.{key}")
            allowed = {"type", "optional", "any_of", "required_if"}
            extra = sorted(set(body) - allowed)
            if extra:
                raise self.fail(f"{where}.{key}.{extra[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")
            if body.get("type") not in INPUT_TYPES:
                raise self.fail(f"{where}.{key}.type", f"must be one of {', '.join(INPUT_TYPES)}")
            out[key] = InputInfo(
                key=key,
                type=body["type"],
                optional=bool(body.get("optional", False)),
                any_of=body.get("any_of"),
                required_if=dict(self.mapping(body.get("required_if"), f"{where}.{key}.required_if")),
            )
        return out

    def source_file(self, body: Any, where: str) -> SourceFile:
        body = self.mapping(body, where)
        runtime = body.get("runtime")
        if runtime not in RUNTIMES:
            raise self.fail(f"{where}.runtime", "must be extracted_folder or absent")
        return SourceFile(file=self.required(body, "file", where), runtime=runtime,
                          optional=bool(body.get("optional", False)))

    def data_sources(self, value: Any, where: str) -> Dict[str, DataSource]:
        out = {}
        for key, body in self.mapping(value, where).items():
            here = f"{where}.{key}"
            body = self.mapping(body, here)
            has_file, has_fields = "file" in body, "fields" in body
            if has_file == has_fields:
                raise self.fail(here, "give exactly one of `file` (a leaf key) or `fields` (a section)")
            fields = {
                name: self.source_file(sub, f"{here}.fields.{name}")
                for name, sub in self.mapping(body.get("fields"), f"{here}.fields").items()
            }
            out[key] = DataSource(
                key=key,
                source=self.required(body, "source", here),
                list=bool(body.get("list", False)),
                file=self.source_file(body, here) if has_file else None,
                fields=fields,
            )
        return out

    def deploy(self, body: Any, where: str, references: Path) -> DeployInfo:
        body = self.mapping(body, where)
        keys = body.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise self.fail(f"{where}.keys", "expected a list of dotted spec keys")
        return DeployInfo(
            template=references / self.required(body, "template", where),
            keys=tuple(keys),
            spec_params=self.strings(body.get("spec_params"), f"{where}.spec_params"),
        )
