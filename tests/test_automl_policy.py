"""automl_policy: explicit value, request phrases, defaults, missing files, and what a job records."""
from __future__ import annotations

import pytest

from sdk.automl_policy import decide, phrase_policy
from sdk.errors import SkillBankError
from sdk.jobs import SkillBank
from sdk.skill_info import load_skill_info

OFF = ["Train Grounding DINO but turn off AutoML", "please disable automl for this run", "no HPO, just the spec",
       "train without AutoML", "plain training please", "don't use AutoML", "automl off", "skip hyperparameter search",
       "Do not run Optuna"]
ON = ["train with AutoML", "run HPO on lr", "search the hyperparameters"]
NEUTRAL = ["train grounding dino on my data", "fine-tune for 3 epochs", "what does automl do?"]


@pytest.fixture
def files(tmp_path):
    schema, template = tmp_path / "train.schema.json", tmp_path / "spec_template_train.yaml"
    schema.write_text("{}")
    template.write_text("{}")
    return [schema, template]


@pytest.mark.parametrize("text", OFF)
def test_off_phrases(text, files):
    decision = decide("train", request_text=text, automl_enabled=True, required_files=files)
    assert decision.policy == "off" and decision.source.startswith("request phrase")


@pytest.mark.parametrize("text", ON)
def test_on_phrases(text):
    assert phrase_policy(text)[0] == "on"


@pytest.mark.parametrize("text", NEUTRAL)
def test_neutral_requests_take_the_default(text, files):
    assert phrase_policy(text) is None
    assert decide("train", request_text=text, automl_enabled=True, required_files=files).policy == "on"
    assert decide("train", request_text=text, automl_enabled=False).policy == "off"


def test_explicit_value_wins_over_phrases(files):
    decision = decide("train", explicit="on", request_text="turn off AutoML", automl_enabled=True,
                      required_files=files)
    assert (decision.policy, decision.source) == ("on", "explicit automl_policy")
    with pytest.raises(SkillBankError, match="must be 'on' or 'off'"):
        decide("train", explicit="maybe", automl_enabled=True, required_files=files)


def test_other_actions_never_run_automl(files):
    assert decide("evaluate", automl_enabled=True, required_files=files).policy == "off"
    with pytest.raises(SkillBankError, match="train only"):
        decide("export", explicit="on", automl_enabled=True, required_files=files)


def test_enabled_but_not_runnable_names_the_missing_file(files):
    files[1].unlink()
    with pytest.raises(SkillBankError, match=f"AutoML enabled but not runnable: {files[1]}"):
        decide("train", automl_enabled=True, required_files=files)
    # Turning it off still works without the files.
    assert decide("train", request_text="no automl", automl_enabled=True, required_files=files).policy == "off"
    with pytest.raises(SkillBankError, match="not enabled for this model"):
        decide("train", explicit="on", automl_enabled=False, required_files=files)


def test_job_records_policy_and_source(workspace, tiny_data):
    info = load_skill_info()
    assert info.automl_enabled and info.action("train").schema.is_file() and info.action("train").template.is_file()
    bank = SkillBank(workspace)
    default = bank.create_job("train", spec=tiny_data["spec"], start=False)
    assert default.record["automl_policy"] == "on"
    assert default.record["automl_policy_source"] == "default: skill_info automl_enabled"
    phrased = bank.create_job("train", spec=tiny_data["spec"], request="plain training please", start=False)
    assert phrased.record["automl_policy"] == "off" and "plain training" in phrased.record["automl_policy_source"]
