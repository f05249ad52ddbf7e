"""Per-image name sampling for training captions; the captions themselves are built by grounding_dino.formats."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np

# The predictor and the inference action import these two from here.
from ..formats.captions import build_caption, normalize_name  # noqa: F401


def shares_a_word(name: str, positives: Sequence[str]) -> bool:
    words = set(name.lower().split())
    return any(words & set(p.lower().split()) for p in positives)


def sample_names(
    positives: Sequence[str],
    negatives: Sequence[str],
    max_labels: int,
    rng: np.random.Generator,
    fits: Optional[Callable[[List[str]], bool]] = None,
    hard_negatives: bool = False,
) -> List[str]:
    """The names of one training caption: every positive, then sampled negatives, in a shuffled order.

    Positives are never dropped; negatives (those not among the positives) fill up to `max_labels`. With
    `hard_negatives`, names that share a word with a positive ("orange circle" beside an orange hexagon) are drawn
    first and the rest fill what is left: a caption that holds only easy negatives lets the model match on one word.
    `fits`, when given, says whether a list of names fits the text encoder; negatives are trimmed until it does (the
    last drawn go first, so hard ones stay). Inputs are sorted first so the result depends only on the rng, never
    on set order (PYTHONHASHSEED).
    """
    names = sorted(set(positives))
    chosen = set(names)
    pool = sorted(set(negatives) - chosen)
    k = min(len(pool), max(max_labels - len(names), 0))
    pools = [pool]
    if hard_negatives:
        pools = [[n for n in pool if shares_a_word(n, names)], [n for n in pool if not shares_a_word(n, names)]]
    sampled: List[str] = []
    for part in pools:
        take = min(len(part), k - len(sampled))
        if take > 0:
            sampled += [part[i] for i in rng.choice(len(part), size=take, replace=False)]
    if fits is not None:
        while sampled and not fits(names + sampled):
            sampled.pop()
    names += sampled
    return [names[i] for i in rng.permutation(len(names))]
