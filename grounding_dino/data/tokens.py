"""Token counts of caption names by the model's own tokenizer, so captions can be checked against max_text_len.

With a WordPiece tokenizer (BERT, MiniLM) text is split at spaces and punctuation before word pieces are formed,
so the caption "a . b ." costs [CLS] + tokens("a .") + tokens("b .") + [SEP] (grounding_dino.formats.caption_tokens).
Each name is tokenized once at dataset build time; workers then only add up integers.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

from ..formats import SPECIAL_TOKENS, TERMINATOR, caption_tokens


class TokenBudget:
    def __init__(self, costs: Dict[str, int], limit: int):
        self.costs = costs
        self.limit = limit

    @classmethod
    def from_tokenizer(cls, tokenizer, names: Iterable[str]) -> "TokenBudget":
        """`tokenizer(captions, pad_to_max=False)["input_ids"]` and `tokenizer.max_text_len` (CaptionTokenizer)."""
        limit = int(tokenizer.max_text_len)
        costs = {}
        for name in sorted(set(names)):
            ids = tokenizer([name + TERMINATOR], pad_to_max=False)["input_ids"][0]
            # A tokenizer that truncates at the limit hides the true length: count a name that reaches it as too long.
            n = len(ids) if len(ids) < limit else limit + 1
            costs[name] = n - SPECIAL_TOKENS
        return cls(costs, limit)

    def count(self, names: Sequence[str]) -> int:
        return caption_tokens(self.costs[name] for name in names)

    def fits(self, names: Sequence[str]) -> bool:
        return self.count(names) <= self.limit
