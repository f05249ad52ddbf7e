"""Turn token logits and normalised boxes into scored, labelled detections in original-image pixels.

A phrase's score is the mean sigmoid over its tokens (token probabilities times the row-normalised positive map).
The top `num_select` (query, phrase) pairs over the whole image are kept (ties in index order), so one query may
yield several labels; there is no NMS, as in the official and TAO code. With `one_label_per_query` each query keeps
only its best phrase first (as the official repo's image demo does), so a box carries one label.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor
from torchvision.ops import box_convert

from .matcher import normalize_rows

PositiveMaps = Union[Tensor, Sequence[Tensor]]


def _per_image_maps(positive_maps: PositiveMaps, batch: int) -> List[Tensor]:
    """One [C, L] map per image, from a shared [C, L], a stacked [B, C, L] or a list of [C_i, L]."""
    if isinstance(positive_maps, Tensor) and positive_maps.dim() == 2:
        return [positive_maps] * batch
    maps = list(positive_maps)
    if len(maps) != batch:
        raise ValueError(f"{len(maps)} positive maps for a batch of {batch} images: pass one per image or one "
                         "[num_phrases, max_text_len] map shared by the batch")
    return maps


def top_k(scores: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The `k` largest of a 1-D tensor and their indices, best first; equal scores keep their index order, so ties
    resolve the same way in any batch (torch.topk leaves their order to the kernel)."""
    values, index = scores.sort(descending=True, stable=True)
    return values[:k], index[:k]


@torch.no_grad()
def post_process(
    pred_logits: Tensor,
    pred_boxes: Tensor,
    positive_maps: PositiveMaps,
    orig_sizes: Tensor,
    num_select: int = 300,
    one_label_per_query: bool = False,
) -> List[Dict[str, Tensor]]:
    """Per image, the top detections as {`scores` [K], `labels` [K] (phrase index), `boxes` [K, 4] xyxy pixels}.

    pred_logits [B, Q, L] (-inf on padding), pred_boxes [B, Q, 4] normalised cxcywh,
    positive_maps [C, L] for the batch, or [B, C, L] / a list of [C_i, L] per image,
    orig_sizes [B, 2] as (height, width) of the original images.
    K = min(num_select, Q * C) (Q with one_label_per_query), so a short prompt never asks top-k for more entries
    than exist.
    """
    if num_select < 1:
        raise ValueError(f"num_select must be >= 1, got {num_select}")
    batch, num_queries, text_len = pred_logits.shape
    maps = _per_image_maps(positive_maps, batch)
    sizes = torch.as_tensor(orig_sizes, dtype=torch.float32, device=pred_boxes.device).reshape(batch, 2)
    results = []
    for logits, boxes, positive_map, (height, width) in zip(pred_logits, pred_boxes, maps, sizes):
        if positive_map.shape[-1] != text_len:
            raise ValueError(f"positive map has {positive_map.shape[-1]} token columns but pred_logits has "
                             f"{text_len}: build it with width model.max_text_len")
        if positive_map.shape[0] == 0:
            raise ValueError("positive map has no phrases: the prompt must name at least one phrase")
        scores = logits.float().sigmoid() @ normalize_rows(positive_map.to(logits.device).float()).T
        num_classes = scores.shape[-1]
        if one_label_per_query:
            best, label = scores.max(dim=-1)
            top_scores, query = top_k(best, num_select)
            labels = label[query]
        else:
            top_scores, top_index = top_k(scores.flatten(), num_select)
            query = torch.div(top_index, num_classes, rounding_mode="floor")
            labels = top_index % num_classes
        scale = torch.stack([width, height, width, height])
        xyxy = torch.minimum(box_convert(boxes.float()[query], "cxcywh", "xyxy").clamp(min=0) * scale, scale)
        results.append({"scores": top_scores, "labels": labels, "boxes": xyxy})
    return results
