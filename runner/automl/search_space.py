"""The AutoML search space: which spec keys a study samples, over which values, and how.

Everything comes from the train schema, never from a second list in code: the schema's `automl_default_parameters`
(or the user's `automl.automl_hyperparameters`) name the keys, and each key's schema node gives its type, bounds,
options and `x-automl` metadata (valid_min/valid_max, log, valid_options, option_weights, math_cond, depends_on).
Keys that cannot change the result for the chosen spec, and the structural keys grounding_dino/config.py marks (they
change the architecture), are dropped from the default search by EXCLUSION_RULES and reported with the reason; a user
who lists such a key explicitly still gets it searched.

Sampling follows NVIDIA TAO's rules, mapped onto one Optuna distribution per key:
  float       uniform in [min, max], log-uniform when `log` is set or max/min >= 100; a missing max is the spec's
              value (TAO replaces an infinite max by the default); no range at all is [value/10, value*10].
  int         uniform integer; math_cond "/ 32" keeps multiples of 32, "^ 2" keeps powers of two.
  options     weighted choice: Optuna samples a uniform float under the key, mapped through the cumulative
              option_weights, so the sampler still sees one fixed distribution; without weights, a plain
              categorical. Bools are a coin flip.
  "> parent"  (>, >=, <, <=) bounds the key by the value already sampled (or set in the spec) for `parent`;
              parents are always sampled first.
"""
from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from grounding_dino.config import structural_keys
from sdk.errors import SpecError
from sdk.schema_gen import action_schema

_REQUEST_KEY = "automl.automl_hyperparameters"
_RANGES_KEY = "automl.ranges"


# ----------------------------------------------------------------------------------------------------------------
# dotted spec paths


def get_path(spec: Mapping[str, Any], dotted: str) -> Any:
    node: Any = spec
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def apply_params(spec: Mapping[str, Any], values: Mapping[str, Any]) -> Dict[str, Any]:
    """A deep copy of `spec` with each dotted key in `values` set."""
    out = json.loads(json.dumps(spec))
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = value
    return out


# ----------------------------------------------------------------------------------------------------------------
# the schema


def load_train_schema() -> Dict[str, Any]:
    """The generated train schema."""
    return action_schema("train")


def schema_node(schema: Mapping[str, Any], dotted: str) -> Dict[str, Any]:
    """The schema of one dotted key: its own keywords merged with those of the `$ref`/`anyOf` it points to."""
    node: Mapping[str, Any] = schema
    for part in dotted.split("."):
        node = _resolve(schema, node)
        properties = node.get("properties", {})
        if part not in properties:
            raise KeyError(dotted)
        node = properties[part]
    return _resolve(schema, node)


def _resolve(schema: Mapping[str, Any], node: Mapping[str, Any]) -> Dict[str, Any]:
    merged = dict(node)
    if "$ref" in merged:
        target: Any = schema
        for part in merged.pop("$ref").lstrip("#/").split("/"):
            target = target[part]
        merged = {**_resolve(schema, target), **merged}
    for combinator in ("anyOf", "oneOf", "allOf"):
        branches = [b for b in merged.pop(combinator, []) if b.get("type") != "null"]
        if len(branches) == 1:
            merged = {**_resolve(schema, branches[0]), **merged}
    return merged


def _value_type(node: Mapping[str, Any]) -> Optional[str]:
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind


# ----------------------------------------------------------------------------------------------------------------
# parameters


@dataclass(frozen=True)
class Bound:
    """math_cond "> parent": the key's value must compare `op` with the parent's value."""

    op: str
    parent: str


@dataclass(frozen=True)
class Param:
    """One searched key. `kind` picks its sampler in _SAMPLERS."""

    key: str
    kind: str  # float | int | multiple | power | choice
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[int] = None  # multiple: the values are multiples of step; power: the base
    options: Optional[Tuple[Any, ...]] = None
    weights: Optional[Tuple[float, ...]] = None
    bound: Optional[Bound] = None

    def sample(self, trial, sampled: Mapping[str, Any]) -> Any:
        return _SAMPLERS[self.kind](self, trial, sampled)

    def describe(self) -> str:
        if self.kind == "choice":
            weights = f", weights {list(self.weights)}" if self.weights else ""
            return f"one of {list(self.options)}{weights}"
        text = f"[{self.low:g}, {self.high:g}]"
        if self.kind == "multiple":
            text += f" in multiples of {self.step}"
        elif self.kind == "power":
            text += f" in powers of {self.step}"
        elif self.log:
            text += " log scale"
        if self.bound:
            text += f", {self.bound.op} {self.bound.parent}"
        return f"{self.kind} {text}"


def _bounded_range(param: Param, sampled: Mapping[str, Any]) -> Tuple[float, float]:
    low, high = param.low, param.high
    if param.bound is None:
        return low, high
    parent = sampled[param.bound.parent]
    # Integers turn a strict bound into the next integer; floats cannot, and equality has probability zero.
    strict = 1 if param.kind != "float" else 0
    if param.bound.op in (">", ">="):
        low = max(low, parent + (strict if param.bound.op == ">" else 0))
    else:
        high = min(high, parent - (strict if param.bound.op == "<" else 0))
    if low > high:
        raise ValueError(f"{param.key}: no value is {param.bound.op} {param.bound.parent} = {parent} within "
                         f"[{param.low:g}, {param.high:g}]")
    return low, high


def _sample_float(param: Param, trial, sampled: Mapping[str, Any]) -> float:
    low, high = _bounded_range(param, sampled)
    return trial.suggest_float(param.key, low, high, log=param.log)


def _sample_int(param: Param, trial, sampled: Mapping[str, Any]) -> int:
    low, high = _bounded_range(param, sampled)
    return trial.suggest_int(param.key, int(math.ceil(low)), int(math.floor(high)), log=param.log)


def _sample_multiple(param: Param, trial, sampled: Mapping[str, Any]) -> int:
    low, high = _bounded_range(param, sampled)
    step = param.step
    return trial.suggest_int(param.key, step * math.ceil(low / step), step * math.floor(high / step), step=step)


def _sample_power(param: Param, trial, sampled: Mapping[str, Any]) -> int:
    low, high = _bounded_range(param, sampled)
    return trial.suggest_categorical(param.key, _powers(param.step, low, high))


def _sample_choice(param: Param, trial, sampled: Mapping[str, Any]) -> Any:
    if param.weights is None:
        return trial.suggest_categorical(param.key, list(param.options))
    cumulative = []
    total = 0.0
    for weight in param.weights:
        total += weight
        cumulative.append(total / sum(param.weights))
    draw = trial.suggest_float(param.key, 0.0, 1.0)
    return param.options[min(bisect.bisect_right(cumulative, draw), len(param.options) - 1)]


_SAMPLERS: Dict[str, Callable[[Param, Any, Mapping[str, Any]], Any]] = {
    "float": _sample_float,
    "int": _sample_int,
    "multiple": _sample_multiple,
    "power": _sample_power,
    "choice": _sample_choice,
}


def _powers(base: int, low: float, high: float) -> List[int]:
    values, value = [], 1
    while value <= high:
        if value >= low:
            values.append(value)
        value *= base
    return values


# ----------------------------------------------------------------------------------------------------------------
# keys that cannot change the result for a given spec


def _momentum(spec: Mapping[str, Any]) -> Optional[str]:
    optimizer = get_path(spec, "train.optim.optimizer")
    if optimizer.lower().startswith("adam"):
        return f"the {optimizer} optimizer does not use momentum (it has betas instead)"
    return None


def _lr_step_size(spec: Mapping[str, Any]) -> Optional[str]:
    scheduler = get_path(spec, "train.optim.lr_scheduler")
    if scheduler != "StepLR":
        return f"only the StepLR scheduler reads it; train.optim.lr_scheduler is {scheduler}"
    return None


def _lr_decay(spec: Mapping[str, Any]) -> Optional[str]:
    epochs = get_path(spec, "train.num_epochs")
    steps = get_path(spec, "train.optim.lr_steps")
    if get_path(spec, "train.optim.lr_scheduler") == "MultiStep" and all(step >= epochs for step in steps):
        return (f"no MultiStep milestone in train.optim.lr_steps {steps} comes before train.num_epochs {epochs}, "
                "so the learning rate never decays")
    return None


def _post_processing(spec: Mapping[str, Any]) -> str:
    return ("post-processing only: it changes how many detections are kept, not the trained weights; searching it "
            "would tune the validation metric, not the model (set it for evaluate/inference instead)")


def _structural(spec: Mapping[str, Any]) -> str:
    return ("structural: it changes the architecture, so pretrained or parent checkpoints no longer load and "
            "trials would not share a starting point")


EXCLUSION_RULES: Dict[str, Callable[[Mapping[str, Any]], Optional[str]]] = {
    "train.optim.momentum": _momentum,
    "train.optim.lr_step_size": _lr_step_size,
    "train.optim.lr_decay": _lr_decay,
    "model.num_select": _post_processing,
    **{key: _structural for key in structural_keys()},
}


# ----------------------------------------------------------------------------------------------------------------
# building the space


@dataclass(frozen=True)
class SearchSpace:
    """Parameters in sampling order (parents first), the keys left out with the reason for each, and notes.

    fixed: values of bound parents that are not searched, taken from the spec.
    """

    params: Tuple[Param, ...]
    excluded: Tuple[Tuple[str, str], ...] = ()
    notes: Tuple[str, ...] = ()
    fixed: Tuple[Tuple[str, Any], ...] = ()

    def sample(self, trial) -> Dict[str, Any]:
        """One value per searched key, suggested through `trial`."""
        sampled: Dict[str, Any] = dict(self.fixed)
        for param in self.params:
            sampled[param.key] = param.sample(trial, sampled)
        return {param.key: sampled[param.key] for param in self.params}

    @property
    def keys(self) -> List[str]:
        return [param.key for param in self.params]

    def spec_point(self, spec: Mapping[str, Any]) -> Dict[str, Any]:
        """The spec's own values as Optuna parameters (what `study.enqueue_trial` takes), for the keys whose spec
        value lies inside the searched space; the other keys are left to the sampler."""
        values: Dict[str, Any] = dict(self.fixed)
        point: Dict[str, Any] = {}
        for param in self.params:
            value = get_path(spec, param.key)
            values[param.key] = value
            try:
                internal = _as_parameter(param, value, values)
            except ValueError:  # an impossible bound: the sampler reports it when the trial runs
                internal = None
            if internal is not None:
                point[param.key] = internal
        return point


def _as_parameter(param: Param, value: Any, values: Mapping[str, Any]) -> Any:
    """`value` as the Optuna parameter `param` suggests, or None when the space cannot produce it."""
    if param.kind == "choice":
        if value not in param.options:
            return None
        if param.weights is None:
            return value
        # The weighted draw is a uniform float: the middle of the value's share of [0, 1) maps back to it.
        index = param.options.index(value)
        total = sum(param.weights)
        if param.weights[index] <= 0:
            return None
        start = sum(param.weights[:index]) / total
        return start + param.weights[index] / total / 2
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high = _bounded_range(param, values)
    if not low <= value <= high:
        return None
    if param.kind == "float":
        return float(value)
    if value != int(value):
        return None
    value = int(value)
    if param.kind == "multiple" and value % param.step:
        return None
    if param.kind == "power" and value not in _powers(param.step, low, high):
        return None
    return value


def build_search_space(
    spec: Mapping[str, Any],
    schema: Optional[Mapping[str, Any]] = None,
    requested: Optional[Sequence[str]] = None,
) -> "SearchSpace":
    """The search space of a full spec (a nested dict with every key filled).

    requested: dotted keys to search; by default the spec's automl.automl_hyperparameters, and when that is empty
    the schema's automl_default_parameters minus the keys EXCLUSION_RULES rule out for this spec.
    """
    schema = load_train_schema() if schema is None else schema
    if requested is None:
        requested = list(get_path(spec, _REQUEST_KEY) or [])
    explicit = bool(requested)
    excluded: List[Tuple[str, str]] = []
    notes: List[str] = []
    if explicit:
        keys = list(dict.fromkeys(requested))
        for key in keys:
            reason = EXCLUSION_RULES.get(key, lambda _: None)(spec)
            if reason:
                notes.append(f"{key} is searched because it was asked for, although {reason}")
    else:
        keys = []
        for key in schema.get("automl_default_parameters", []):
            reason = EXCLUSION_RULES.get(key, lambda _: None)(spec)
            if reason:
                excluded.append((key, reason))
            else:
                keys.append(key)
        for key in schema.get("automl_disabled_parameters", []):
            if "x-automl" in _node_or_empty(schema, key):
                reason = EXCLUSION_RULES.get(key, lambda _: None)(spec)
                excluded.append((key, reason or "disabled in the schema (x-automl enabled: false)"))
        if not keys:
            raise SpecError.single(_REQUEST_KEY, [], "the train schema enables no AutoML parameter for this spec; "
                                                     "list the keys to search in automl.automl_hyperparameters")
    ranges = dict(get_path(spec, _RANGES_KEY) or {})
    for key in ranges:
        if key not in keys:
            raise SpecError.single(f"{_RANGES_KEY}.{key}", ranges[key],
                                   f"{key} is not searched; add it to {_REQUEST_KEY} or drop its range")
    params = _parents_first([_param(schema, spec, key, explicit, index, ranges.get(key))
                             for index, key in enumerate(keys)])
    fixed = {}
    for param in params:
        if param.bound and param.bound.parent not in keys:
            try:
                fixed[param.bound.parent] = get_path(spec, param.bound.parent)
            except KeyError:
                raise SpecError.single(param.key, param.bound.parent, "math_cond compares with a key that is not "
                                                                      "in the spec") from None
    _check_bounds(params, fixed)
    return SearchSpace(tuple(params), tuple(excluded), tuple(notes), tuple(fixed.items()))


def _node_or_empty(schema: Mapping[str, Any], key: str) -> Dict[str, Any]:
    try:
        return schema_node(schema, key)
    except KeyError:
        return {}


def _param(schema: Mapping[str, Any], spec: Mapping[str, Any], key: str, explicit: bool, index: int,
           given_range: Optional[Sequence[float]] = None) -> Param:
    where = f"{_REQUEST_KEY}[{index}]" if explicit else f"train schema automl_default_parameters: {key}"
    try:
        node = schema_node(schema, key)
        value = get_path(spec, key)
    except KeyError:
        raise SpecError.single(where, key, "not a key of the train spec; use a dotted path such as "
                                           "train.optim.lr") from None
    meta = node.get("x-automl", {})
    kind = _value_type(node)
    options = meta.get("valid_options") or node.get("enum")
    if kind == "boolean" and not options:
        options = [False, True]
    if given_range is not None and (options or kind not in ("number", "integer")):
        raise SpecError.single(f"{_RANGES_KEY}.{key}", list(given_range),
                               "only numeric keys take a range; a key with options is searched over its options")
    if options:
        weights = meta.get("option_weights")
        if weights is not None and (len(weights) != len(options) or min(weights) < 0 or sum(weights) <= 0):
            raise SpecError.single(where, key, f"option_weights {weights} must be one non-negative weight per "
                                               f"option {options}, not all zero")
        return Param(key, "choice", options=tuple(options), weights=tuple(weights) if weights else None)
    if kind not in ("number", "integer"):
        raise SpecError.single(where, key, f"a {kind} key without options cannot be searched; choose numeric, "
                                           "boolean or enumerated keys")
    if given_range is None:
        low, high = _range(node, meta, value, key, where)
    else:
        low, high = _given_range(node, key, given_range)
    cond = (meta.get("math_cond") or "").strip()
    bound = None
    step = None
    kind = "float" if kind == "number" else "int"
    if match := re.fullmatch(r"/\s*(\d+)", cond):
        kind, step = "multiple", int(match.group(1))
    elif match := re.fullmatch(r"\^\s*(\d+)", cond):
        kind, step = "power", int(match.group(1))
    elif match := re.fullmatch(r"(>=|<=|>|<)\s*([\w.]+)", cond):
        bound = Bound(match.group(1), match.group(2))
    elif cond:
        raise SpecError.single(where, key, f"math_cond {cond!r} is not understood; use '/ N', '^ N' or "
                                           "'> other.key' (>, >=, <, <=)")
    depends_on = meta.get("depends_on")
    if depends_on and bound is None:
        raise SpecError.single(where, key, f"depends_on {depends_on!r} needs a math_cond that compares with it")
    if depends_on and depends_on != bound.parent:
        raise SpecError.single(where, key, f"math_cond compares with {bound.parent} but depends_on names "
                                           f"{depends_on}; they must be the same key")
    if kind == "multiple" and step * math.ceil(low / step) > high:
        raise SpecError.single(where, key, f"no multiple of {step} lies in [{low:g}, {high:g}]")
    if kind == "power" and not _powers(step, low, high):
        raise SpecError.single(where, key, f"no power of {step} lies in [{low:g}, {high:g}]")
    log = bool(meta.get("log")) or (kind in ("float", "int") and low > 0 and high / low >= 100)
    if log and low <= 0:
        raise SpecError.single(where, key, f"a log-scale range must be positive, got [{low:g}, {high:g}]")
    return Param(key, kind, low=low, high=high, log=log, step=step, bound=bound)


def _range(node: Mapping[str, Any], meta: Mapping[str, Any], value: Any, key: str, where: str) -> Tuple[float, float]:
    low = _first(meta.get("valid_min"), node.get("minimum"), node.get("exclusiveMinimum"))
    high = _first(meta.get("valid_max"), node.get("maximum"))
    if low is None and high is None and isinstance(value, (int, float)) and value > 0:
        low, high = value / 10, value * 10
    elif high is None and isinstance(value, (int, float)):
        high = value
    elif low is None and isinstance(value, (int, float)):
        low = min(value, high)
    if low is None or high is None or not low < high:
        raise SpecError.single(where, key, f"no search range: bounds [{low}, {high}] with spec value {value!r}; "
                                           "give x-automl valid_min < valid_max")
    return float(low), float(high)


def _given_range(node: Mapping[str, Any], key: str, given: Sequence[float]) -> Tuple[float, float]:
    """automl.ranges[key], checked against the key's hard limits in the schema."""
    where = f"{_RANGES_KEY}.{key}"
    if (len(given) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given)
            or not given[0] < given[1]):
        raise SpecError.single(where, list(given), "give [min, max] with min < max")
    low, high = float(given[0]), float(given[1])
    floor = _first(node.get("minimum"), node.get("exclusiveMinimum"))
    if floor is not None and (low < floor or (low == floor and "exclusiveMinimum" in node)):
        raise SpecError.single(where, list(given), f"{key} must be {'>' if 'exclusiveMinimum' in node else '>='} "
                                                   f"{floor:g}; raise the minimum")
    ceiling = node.get("maximum")
    if ceiling is not None and high > ceiling:
        raise SpecError.single(where, list(given), f"{key} must be <= {ceiling:g}; lower the maximum")
    return low, high


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _check_bounds(params: List[Param], fixed: Mapping[str, Any]) -> None:
    """Fail now, not in trial 7, when a bound can leave a key with no value: try the parent's worst value."""
    by_key = {p.key: p for p in params}
    for param in params:
        if param.bound is None:
            continue
        parent = by_key.get(param.bound.parent)
        if parent is None:
            worst = fixed[param.bound.parent]
        elif parent.kind == "choice":
            worst = max(parent.options) if param.bound.op in (">", ">=") else min(parent.options)
        else:
            worst = parent.high if param.bound.op in (">", ">=") else parent.low
        try:
            _bounded_range(param, {param.bound.parent: worst})
        except ValueError as error:
            raise SpecError.single(param.key, worst, f"{error}; widen its range or narrow {param.bound.parent}'s"
                                   ) from None


def _parents_first(params: List[Param]) -> List[Param]:
    """Order params so each bound parent comes before its dependants; cycles are an error."""
    by_key = {p.key: p for p in params}
    ordered: List[Param] = []
    state: Dict[str, str] = {}

    def visit(param: Param, chain: Tuple[str, ...]) -> None:
        if state.get(param.key) == "done":
            return
        if state.get(param.key) == "visiting":
            raise SpecError.single(_REQUEST_KEY, list(chain), "depends_on forms a cycle")
        state[param.key] = "visiting"
        if param.bound and param.bound.parent in by_key:
            visit(by_key[param.bound.parent], chain + (param.bound.parent,))
        state[param.key] = "done"
        ordered.append(param)

    for param in params:
        visit(param, (param.key,))
    return ordered
