"""automl_policy: whether a train request runs through the AutoML (Optuna) driver or trains directly.

Precedence: an explicit value, then phrases in the free-text request, then the default (on for train when the
model's skill contract enables AutoML). The decision records where it came from, so job.json can say why a job
searched hyperparameters or did not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from sdk.errors import SkillBankError

POLICIES = ("on", "off")

# Off-phrases are tried before on-phrases: "don't use AutoML" contains "use AutoML".
_AUTOML = r"(?:auto[\s-]?ml|hpo|hyper[\s-]?parameter (?:search|tuning|optimi[sz]ation|sweep)s?|optuna)"
_OFF = [
    rf"\b(?:turn(?:ing)?|switch(?:ing)?|shut(?:ting)?)\s+off\s+(?:the\s+)?{_AUTOML}",
    rf"\b{_AUTOML}\s+(?:off|disabled)\b",
    rf"\b(?:disable|disabling|skip|skipping|avoid|without|no|bypass)\s+(?:the\s+|any\s+)?{_AUTOML}",
    rf"\b(?:don'?t|do\s+not|never)\s+(?:use|run|do|want)\s+(?:the\s+|any\s+)?{_AUTOML}",
    r"\bplain\s+training\b",
    r"\b(?:just|only|simply)\s+train\b",
    r"\bdirect(?:ly)?\s+train(?:ing)?\b",
    r"\bsingle\s+(?:training\s+)?run\b",
    r"\bfixed\s+hyper[\s-]?parameters\b",
]
_ON = [
    rf"\b(?:use|run|with|enable|turn\s+on|do)\s+(?:an\s+|the\s+)?{_AUTOML}",
    rf"\b{_AUTOML}\s+on\b",
    r"\b(?:search|tune|optimi[sz]e)\s+(?:the\s+)?hyper[\s-]?parameters\b",
]


@dataclass(frozen=True)
class AutomlDecision:
    policy: str  # "on" or "off"
    source: str  # where the decision came from, in words


def phrase_policy(text: Optional[str]) -> Optional[tuple[str, str]]:
    """(policy, matched phrase) found in a free-text request, or None."""
    if not text:
        return None
    lowered = " ".join(text.lower().split())
    for policy, patterns in (("off", _OFF), ("on", _ON)):
        for pattern in patterns:
            match = re.search(pattern, lowered)
            if match:
                return policy, match.group(0)
    return None


def decide(
    action: str,
    *,
    explicit: Optional[str] = None,
    request_text: Optional[str] = None,
    automl_enabled: bool,
    required_files: Iterable[Path] = (),
) -> AutomlDecision:
    """Decide the policy for one request.

    required_files: what the AutoML driver needs (the train schema and template); when AutoML would be used and
    one is missing, this raises instead of silently training without a search.
    """
    if explicit is not None and explicit not in POLICIES:
        raise SkillBankError(f"automl_policy = {explicit!r}: must be 'on' or 'off'.")
    if action != "train":
        if explicit == "on":
            raise SkillBankError(f"automl_policy=on applies to train only, not {action!r}. Fix: drop it.")
        return AutomlDecision("off", f"{action} never runs AutoML")
    if explicit is not None:
        decision = AutomlDecision(explicit, "explicit automl_policy")
    elif (found := phrase_policy(request_text)) is not None:
        decision = AutomlDecision(found[0], f"request phrase {found[1]!r}")
    elif automl_enabled:
        decision = AutomlDecision("on", "default: skill_info automl_enabled")
    else:
        decision = AutomlDecision("off", "default: skill_info does not enable AutoML")
    if decision.policy == "on":
        if not automl_enabled:
            raise SkillBankError("AutoML is not enabled for this model (skill_info automl_enabled is false). "
                                 "Fix: run with automl_policy=off.")
        missing = [str(p) for p in required_files if not Path(p).is_file()]
        if missing:
            raise SkillBankError(f"AutoML enabled but not runnable: {', '.join(missing)} missing. Fix: run "
                                 "`skillbank schemas generate`, or train without it (automl_policy=off).")
    return decision
