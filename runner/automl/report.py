"""automl_report.md and its plots (matplotlib, Agg backend) for an AutoML study.

Parameter importance is Optuna's default evaluator, PED-ANOVA, which needs only numpy, so the report is the same
offline. It ranks the values Optuna sampled: for a weighted choice that is the uniform draw behind the option.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Dict, List

import optuna
from optuna.trial import FrozenTrial, TrialState

from runner.automl.search_space import SearchSpace
from runner.automl.study import CHECKPOINT_ATTR, ERROR_ATTR, PARAMS_ATTR, SURPLUS_ATTR, budget_used

REPORT_FILE = "automl_report.md"


def write_report(study: optuna.Study, root: Path, space: SearchSpace, *, metric: str, algorithm: str,
                 storage: str) -> Path:
    trials = [t for t in study.get_trials() if not t.user_attrs.get(SURPLUS_ATTR)]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(completed, key=lambda t: (t.value, -t.number), default=None)
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    lines = [
        f"# AutoML report: {study.study_name}",
        "",
        f"- storage: `{storage}`",
        f"- algorithm: {algorithm}; objective: maximise `{metric}`",
        f"- trials: {budget_used(trials)} counted; " + ", ".join(f"{n} {s}" for s, n in states.items() if n),
    ]
    if best is not None:
        checkpoint = best.user_attrs.get(CHECKPOINT_ATTR, "?")
        lines.append(f"- best: trial {best.number}, {metric} = {best.value:.4f}, checkpoint `best_model/{checkpoint}`")
    lines += ["", "## Search space", "", "| key | sampled as |", "|---|---|"]
    lines += [f"| `{p.key}` | {p.describe()} |" for p in space.params]
    if space.excluded:
        lines += ["", "## Not searched", "", "| key | reason |", "|---|---|"]
        lines += [f"| `{key}` | {reason} |" for key, reason in space.excluded]
    if space.notes:
        lines += [""] + [f"Note: {note}." for note in space.notes]
    lines += ["", "## Trials", "", _trial_table(trials, space.keys, metric)]
    lines += ["", "## Parameter importance", ""] + _importance(study, completed)
    lines += ["", "## Plots", ""]
    for title, file in _plots(study, root, metric, completed):
        lines.append(f"![{title}]({file})" if file else f"- {title}")
    path = root / REPORT_FILE
    path.write_text("\n".join(lines) + "\n")
    return path


def _trial_table(trials: List[FrozenTrial], keys: List[str], metric: str) -> str:
    header = ["trial", "state", metric, "epochs", "seconds"] + [f"`{k}`" for k in keys] + ["note"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        values = t.user_attrs.get(PARAMS_ATTR, {})
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        cells = [
            str(t.number),
            t.state.name,
            f"{t.value:.4f}" if t.value is not None else "",
            str(t.last_step) if t.last_step is not None else "",
            f"{seconds:.0f}" if seconds is not None else "",
            *(_cell(values.get(k)) for k in keys),
            t.user_attrs.get(ERROR_ATTR, "").replace("|", "/").replace("\n", " ")[:120],
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _importance(study: optuna.Study, completed: List[FrozenTrial]) -> List[str]:
    if len(completed) < 2:
        return [f"Not computed: {len(completed)} completed trial(s); importance needs at least 2."]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "few trials per regime": the table shows the counts
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError) as error:
        return [f"Not computed: {error}"]
    lines = ["PED-ANOVA (Optuna's default evaluator), normalised to sum 1:", "", "| key | importance |", "|---|---|"]
    return lines + [f"| `{key}` | {value:.3f} |" for key, value in importances.items()]


def _plots(study: optuna.Study, root: Path, metric: str, completed: List[FrozenTrial]):
    """(title, file name or None) per plot; a plot that cannot be drawn yet says why instead of a file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    plots: Dict[str, Callable] = {
        "optimization_history.png": lambda: oplt.plot_optimization_history(study, target_name=metric),
        "intermediate_values.png": lambda: oplt.plot_intermediate_values(study),
        "param_importances.png": lambda: oplt.plot_param_importances(study, target_name=metric),
        "parallel_coordinate.png": lambda: oplt.plot_parallel_coordinate(study, target_name=metric),
    }
    needs_two = {"param_importances.png", "parallel_coordinate.png"}
    drawn = []
    for file, draw in plots.items():
        title = file.removesuffix(".png").replace("_", " ")
        if file in needs_two and len(completed) < 2:
            drawn.append((f"{title}: needs at least 2 completed trials", None))
            continue
        with warnings.catch_warnings():
            # Optuna's matplotlib plots are "experimental"; they also warn about small studies (no legend entries)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)
            axes = draw()
        figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
        figure.set_size_inches(9, 5)
        figure.tight_layout()
        figure.savefig(root / file, dpi=80)
        plt.close(figure)
        drawn.append((title, file))
    return drawn

