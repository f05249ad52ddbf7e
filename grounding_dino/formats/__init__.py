"""Readers of the dataset file formats (ODVG JSON lines, COCO JSON, label maps) and the caption token counter.

Torch-free on purpose: the SDK (preflight, `skillbank data`) imports this package to check and convert data in
processes that never load torch, and the training data pipeline reads the same files through the same code, so a
file that passes preflight is read the same way by training. Keep torch (and anything that imports it) out.
"""
from .captions import SEPARATOR, TERMINATOR, build_caption, normalize_name
from .coco import check_coco, coco_categories, load_coco, read_coco
from .files import FormatError, NotJson
from .odvg import OdvgRecord, parse_odvg, read_label_map, read_odvg
from .tokens import SPECIAL_TOKENS, TokenCounter, caption_tokens, minilm_folder

__all__ = [
    "SEPARATOR", "SPECIAL_TOKENS", "TERMINATOR", "FormatError", "NotJson", "OdvgRecord", "TokenCounter",
    "build_caption", "caption_tokens", "check_coco", "coco_categories", "load_coco", "minilm_folder",
    "normalize_name", "parse_odvg", "read_coco", "read_label_map", "read_odvg",
]
