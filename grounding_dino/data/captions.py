"""Per-image name sampling for training captions; the captions themselves are built by grounding_dino.formats."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

# The predictor and the inference action import these two from here.
from ..formats.captions import build_caption, normalize_name  # noqa: F401


def sample_names(
    positives: Sequence[str],
    negatives: Sequence[str],
    max_labels: int,
    rng: np.random.Generator,
    fits: Optional[Callable[[List[str]], bool]] = None,
) -> List[str]:
    """The names of one training caption: every positive, then sampled negatives, in a shuffled order.

    Positives are never dropped; negatives (those not among the positives) fill up to `max_labels`. `fits`, when
    given, says whether a list of names fits the text encoder; negatives are trimmed until it does. Inputs are
    sorted first so the result depends only on the rng, never on set order (PYTHONHASHSEED).
    """
    names = sorted(set(positives))
    chosen = set(names)
    pool = sorted(set(negatives) - chosen)
    k = min(len(pool), max(max_labels - len(names), 0))
    sampled = [pool[i] for i in rng.choice(len(pool), size=k, replace=False)] if k else []
    if fits is not None:
        while sampled and not fits(names + sampled):
            sampled.pop()
    names += sampled
    return [names[i] for i in rng.permutation(len(names))]
