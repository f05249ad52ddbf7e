"""AutoML for train jobs: an Optuna study over the train schema's search space, one training run per trial.

    from runner.automl import run_automl
    study = run_automl("jobs/<id>")          # a job folder, a spec YAML or a spec dict

`skillbank automl worker --study NAME --storage URL -e spec.yaml` adds workers to the same study.
"""
from runner.automl.driver import run_automl
from runner.automl.search_space import SearchSpace, build_search_space

__all__ = ["run_automl", "build_search_space", "SearchSpace"]
