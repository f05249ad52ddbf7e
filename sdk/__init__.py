"""The skill bank SDK: pure Python (no torch). `SkillBank(workspace)` creates and follows jobs.

    from sdk import SkillBank
    bank = SkillBank("workspace")
    job = bank.create_job("train", spec="spec.yaml", overrides={"train.num_epochs": 2}, automl_policy="off")
    print(bank.wait(job.id).status)
"""
from sdk.errors import SkillBankError, SpecError
from sdk.jobs import Job, SkillBank

__all__ = ["Job", "SkillBank", "SkillBankError", "SpecError"]
