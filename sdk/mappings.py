"""Mapping functions: spec values the SDK fills from job folders before a job launches.

skill_info.yaml's `spec_params` names, per action, which function fills which spec key. Each function takes a
`MappingContext` and the dotted key and returns the value to set, or KEEP to leave the request's value alone.

The file names come from grounding_dino/layout.py. An action writes where `results_dir_for` says, so artifacts are
looked up there and in `results/<action>/` and `results/` of the job folder (both layouts exist). An AutoML train
job keeps its winner in the best-model folder with its JSON ({"checkpoint": file name, "params": {dotted: value}}),
as runner/automl/driver.py writes them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from grounding_dino.config import inherited_keys, structural_keys
from grounding_dino.layout import BEST_AUTOML, BEST_MODEL_DIR, JOB_RESULTS, parse_checkpoint_name, results_dir_for
from sdk.errors import SkillBankError
from sdk.spec import get_path, set_path

KEEP: Any = object()  # a mapping's "leave the request's value as it is"
ENCRYPTION_KEY_ENV = "SKILLBANK_ENCRYPTION_KEY"

# Settings that shape the weights (marked in grounding_dino/config.py): a checkpoint only loads into a model built the
# same way. They are carried from the parent job's spec and a request may not contradict them.
STRUCTURAL_KEYS = structural_keys()
# Carried too, but a request may change them (warned): how the model sees its input at test time and how many
# detections post-processing keeps. A child evaluated at another resize than its parent trained at scores far lower.
CARRIED_KEYS = inherited_keys()
CARRY_ACTIONS = ("evaluate", "inference", "export", "quantize", "gen_trt_engine")
# ONNX and TensorRT models have a fixed input size: parent section -> keys the child must match.
INPUT_SIZE_SOURCES = {"export": "export", "gen_trt_engine": "gen_trt_engine"}
INPUT_SIZE_TARGETS = {"gen_trt_engine": "gen_trt_engine", "evaluate": "evaluate", "inference": "inference"}


class MappingError(SkillBankError):
    """A spec value that cannot be resolved from the job folders."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    epoch: int
    step: int


@dataclass
class ParentJob:
    """What a child job needs from its parent: its folder, job.json and the spec that ran."""

    job_dir: Path
    job: dict
    spec: dict

    @property
    def id(self) -> str:
        return self.job["id"]

    @property
    def action(self) -> str:
        return self.job["action"]


@dataclass
class MappingContext:
    action: str
    spec: dict  # the resolved spec being built; mappings read earlier results from it
    job_dir: Path
    parent: Optional[ParentJob] = None
    parent_epoch: Optional[int] = None
    parent_step: Optional[int] = None
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


Mapping_ = Callable[[MappingContext, str], Any]
MAPPINGS: Dict[str, Mapping_] = {}


def register(name: str):
    def wrap(fn: Mapping_) -> Mapping_:
        MAPPINGS[name] = fn
        return fn
    return wrap


def get_mapping(name: str) -> Mapping_:
    try:
        return MAPPINGS[name]
    except KeyError:
        raise SkillBankError(f"skill_info names an unknown mapping function {name!r} "
                             f"(known: {', '.join(sorted(MAPPINGS))})") from None


# ---------------------------------------------------------------------------------------------------------------
# artifact lookup


def action_results_dir(spec: dict, action: str) -> Optional[Path]:
    """Where `action` writes, or None while the spec names no results folder yet."""
    try:
        return results_dir_for(action, spec)
    except ValueError:
        return None


def _result_roots(job_dir: Path, action: str, spec: Optional[dict] = None) -> list[Path]:
    roots = []
    if spec:
        declared = action_results_dir(spec, action)
        if declared is not None:
            roots.append(declared)
    roots += [job_dir / JOB_RESULTS / action, job_dir / JOB_RESULTS]
    unique = []
    for root in roots:
        if root not in unique and root.is_dir():
            unique.append(root)
    return unique


def find_checkpoints(*folders: Path) -> list[Checkpoint]:
    """Checkpoints named model_epoch_EEE_step_SSSSS.pth in the folders, oldest to newest by (step, epoch)."""
    found = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            parsed = parse_checkpoint_name(path.name)
            if parsed and path.is_file():
                found[path.resolve()] = Checkpoint(path, *parsed)
    return sorted(found.values(), key=lambda c: (c.step, c.epoch))


def pick_checkpoint(checkpoints: list[Checkpoint], where: str, epoch: Optional[int] = None,
                    step: Optional[int] = None) -> Path:
    """The checkpoint matching epoch/step when asked, else the newest; errors list what is there."""
    if not checkpoints:
        raise MappingError(f"{where} holds no model_epoch_*_step_*.pth checkpoint. Fix: check that the job trained "
                           "at least one checkpoint interval, or pass the model path explicitly.")
    if epoch is None and step is None:
        return checkpoints[-1].path
    matches = [c for c in checkpoints
               if (epoch is None or c.epoch == epoch) and (step is None or c.step == step)]
    if not matches:
        asked = ", ".join(f"{k}={v}" for k, v in (("parent_epoch", epoch), ("parent_step", step)) if v is not None)
        available = ", ".join(c.path.name for c in checkpoints)
        raise MappingError(f"{where} has no checkpoint with {asked}. Available: {available}.")
    return matches[-1].path


def _automl_best(parent: ParentJob) -> Optional[tuple[Path, dict]]:
    """(best_model folder, best_automl.json content) of an AutoML train parent, else None."""
    for root in _result_roots(parent.job_dir, parent.action, parent.spec):
        path = root / BEST_MODEL_DIR / BEST_AUTOML
        if path.is_file():
            try:
                return path.parent, json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise MappingError(f"{path}: line {exc.lineno}: not valid JSON ({exc.msg}).") from None
    return None


def _wanted_suffixes(key: str, parent_action: str) -> tuple[str, ...]:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "onnx_file":
        return (".onnx",)
    if leaf == "trt_engine":
        return (".engine",)
    if parent_action == "gen_trt_engine":
        return (".engine",)
    return (".pth", ".onnx")


def parent_artifact(parent: ParentJob, key: str, epoch: Optional[int] = None, step: Optional[int] = None) -> Path:
    """The model file of a parent job that fills `key` (see the module docstring for the layout)."""
    where = f"parent job {parent.id} ({parent.action})"
    if parent.action == "train":
        if not {".pth"} & set(_wanted_suffixes(key, "train")):
            raise MappingError(f"{key} needs an ONNX or engine file, but {where} produces checkpoints. "
                               "Fix: use an export (or gen_trt_engine) job as the parent.")
        best = _automl_best(parent)
        if best is not None:
            folder, info = best
            if info.get("checkpoint") and epoch is None and step is None:
                path = folder / info["checkpoint"]
                if not path.is_file():
                    raise MappingError(f"{folder / BEST_AUTOML} names {info['checkpoint']}, which does not exist.")
                return path
            return pick_checkpoint(find_checkpoints(folder), f"{where}, {BEST_MODEL_DIR}/", epoch, step)
        if parent.job.get("automl_policy") == "on":
            raise MappingError(f"{where} ran AutoML but has no {BEST_AUTOML} (did it finish?). "
                               "Fix: wait for it, or pass the model path explicitly.")
        roots = _result_roots(parent.job_dir, "train", parent.spec)
        return pick_checkpoint(find_checkpoints(*roots), where, epoch, step)
    if epoch is not None or step is not None:
        raise MappingError(f"parent_epoch/parent_step select a training checkpoint, but {where} is not a train job.")
    suffixes = _wanted_suffixes(key, parent.action)
    found = sorted(
        {p.resolve() for root in _result_roots(parent.job_dir, parent.action, parent.spec)
         for p in root.iterdir() if p.is_file() and p.suffix in suffixes},
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        raise MappingError(f"{where} holds no {'/'.join(suffixes)} file for {key}. "
                           "Fix: check that the parent finished, or pass the path explicitly.")
    return found[-1]


# ---------------------------------------------------------------------------------------------------------------
# the mapping functions named in skill_info.yaml


@register("parent_model")
def parent_model(ctx: MappingContext, key: str) -> Any:
    if ctx.parent is None:
        return KEEP
    return str(parent_artifact(ctx.parent, key, ctx.parent_epoch, ctx.parent_step))


@register("parent_train_vocabulary")
def parent_train_vocabulary(ctx: MappingContext, key: str) -> Any:
    """A train parent's label maps (its annotation files where it has none): the phrases its model was fine-tuned
    on, which evaluate splits the test categories by. Only local files: an s3:// source was fetched into the
    parent's job, not this one."""
    if ctx.parent is None or ctx.parent.action != "train" or get_path(ctx.spec, key, None):
        return KEEP
    sources = get_path(parent_settings(ctx.parent), "dataset.train_data_sources", None) or []
    files = [source.get("label_map") or source.get("json_file") for source in sources if isinstance(source, dict)]
    files = [name for name in files if isinstance(name, str) and "://" not in name]
    return files or KEEP


@register("resume_model")
def resume_model(ctx: MappingContext, key: str) -> Any:
    roots = _result_roots(ctx.job_dir, ctx.action, ctx.spec)
    checkpoints = find_checkpoints(*roots)
    return str(checkpoints[-1].path) if checkpoints else KEEP


@register("ptm_if_no_resume_model")
def ptm_if_no_resume_model(ctx: MappingContext, key: str) -> Any:
    resuming = ctx.spec.get(ctx.action, {}).get("resume_training_checkpoint_path")
    if resuming or find_checkpoints(*_result_roots(ctx.job_dir, ctx.action, ctx.spec)):
        return None  # resuming restores every weight; loading a pretrained model first would be wasted work
    return KEEP


@register("output_dir")
def output_dir(ctx: MappingContext, key: str) -> Any:
    return str(ctx.job_dir / JOB_RESULTS)


@register("create_onnx_file")
def create_onnx_file(ctx: MappingContext, key: str) -> Any:
    folder = action_results_dir(ctx.spec, ctx.action) or ctx.job_dir / JOB_RESULTS
    requested = get_path(ctx.spec, key, None)
    name = Path(requested).name if isinstance(requested, str) and requested.endswith(".onnx") else "model.onnx"
    return str(folder / name)


@register("key")
def key(ctx: MappingContext, key: str) -> Any:
    value = get_path(ctx.spec, key, None)
    return value if value else ctx.env.get(ENCRYPTION_KEY_ENV) or None


def apply_mappings(ctx: MappingContext, spec_params: Mapping[str, str]) -> list[str]:
    """Fill `ctx.spec` from `spec_params` (spec key -> mapping name); returns the keys that were set.

    output_dir runs first: the other mappings derive paths from the results folder it sets.
    """
    order = sorted(spec_params.items(), key=lambda kv: kv[1] != "output_dir")
    filled = []
    for dotted, name in order:
        value = get_mapping(name)(ctx, dotted)
        if value is not KEEP:
            set_path(ctx.spec, dotted, value)
            filled.append(dotted)
    return filled


# ---------------------------------------------------------------------------------------------------------------
# carrying settings forward from the parent


def parent_settings(parent: ParentJob) -> dict:
    """The parent's spec with an AutoML winner's sampled params applied (those built the best model)."""
    if parent.action != "train":
        return parent.spec
    best = _automl_best(parent)
    if best is None:
        return parent.spec
    spec = json.loads(json.dumps(parent.spec))
    for dotted, value in (best[1].get("params") or {}).items():
        set_path(spec, dotted, value)
    return spec


def carry_forward(action: str, spec: dict, user_spec: dict, parent: ParentJob,
                  warn: Callable[[str], None] = lambda message: None) -> list[str]:
    """Copy the parent's model settings and test-time preprocessing into `spec`; refuse a request that contradicts
    a structural setting, and `warn` about one that changes an inherited one.

    user_spec: only what the request itself set (spec file + overrides, no defaults), so a default is never
    mistaken for a contradiction. Returns the keys carried.
    """
    if action not in CARRY_ACTIONS:
        return []
    source = parent_settings(parent)
    pairs = [(k, k) for k in STRUCTURAL_KEYS + CARRIED_KEYS]
    if parent.action in INPUT_SIZE_SOURCES and action in INPUT_SIZE_TARGETS:
        pairs += [(f"{INPUT_SIZE_SOURCES[parent.action]}.{d}", f"{INPUT_SIZE_TARGETS[action]}.{d}")
                  for d in ("input_width", "input_height")]
    conflicts, carried = [], []
    for src, dst in pairs:
        theirs = get_path(source, src, KEEP)
        if theirs is KEEP:
            continue
        ours = get_path(user_spec, dst, KEEP)
        if ours is not KEEP and ours != theirs and dst in CARRIED_KEYS:
            warn(f"{dst}={ours!r} differs from parent job {parent.id}'s {src}={theirs!r}, which its model was "
                 f"trained and validated with; scores may differ from the parent's. Fix: drop {dst} from the "
                 "request to inherit the parent's value, unless the change is meant.")
        elif ours is not KEEP and ours != theirs:
            conflicts.append(f"{dst}={ours!r} (parent {src}={theirs!r})")
        elif ours is KEEP:
            set_path(spec, dst, theirs)
            carried.append(dst)
    if conflicts:
        raise MappingError(f"the request contradicts parent job {parent.id}'s model: {'; '.join(conflicts)}. "
                           "Fix: drop these keys (they are carried from the parent) or use a matching parent.")
    return carried
