"""Hungarian matching between decoder queries and ground-truth boxes.

Grounding DINO classifies against text tokens, not a fixed class list, so the class cost of (query, box) is the
focal cost of the query's token sigmoids averaged over the tokens of the box's phrase (its row-normalised positive
map). Costs for the whole batch are computed in one matrix product; the assignment is solved per image.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

# Keeps log() finite where a sigmoid is exactly 0 or 1 (padding tokens carry -inf logits).
_EPS = 1e-8


def normalize_rows(positive_map: Tensor) -> Tensor:
    """Divide each token map by its token count; an all-zero row (phrase cut off by max_text_len) stays zero."""
    return positive_map / positive_map.sum(-1, keepdim=True).clamp(min=_EPS)


def focal_token_cost(prob: Tensor, alpha: float, gamma: float) -> Tensor:
    """Per-token cost of calling a token positive: focal positive cost minus focal negative cost."""
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + _EPS).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + _EPS).log()
    return pos - neg


class HungarianMatcher(nn.Module):
    """Assigns each ground-truth box to one query, minimising class, L1 and (-GIoU) costs."""

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("model.set_cost_class, set_cost_bbox and set_cost_giou are all 0: set at least one > 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @classmethod
    def from_config(cls, model_cfg) -> "HungarianMatcher":
        """Build from a `grounding_dino.config.ModelConfig`."""
        return cls(
            cost_class=model_cfg.set_cost_class,
            cost_bbox=model_cfg.set_cost_bbox,
            cost_giou=model_cfg.set_cost_giou,
            focal_alpha=model_cfg.focal_alpha,
            focal_gamma=model_cfg.focal_gamma,
        )

    @torch.no_grad()
    def cost_matrix(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> Tensor:
        """Cost of every (query of any image, box of any image) pair: [B, Q, total boxes]."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        batch, num_queries, text_len = logits.shape
        # Costs in float32 even under autocast: bf16 log/pow drift changes assignments.
        prob = logits.flatten(0, 1).float().sigmoid()
        out_boxes = boxes.flatten(0, 1).float()
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(out_boxes)
        tgt_maps = torch.cat([t["positive_map"] for t in targets]).to(prob)
        if tgt_maps.shape[-1] != text_len:
            raise ValueError(
                f"target positive_map has {tgt_maps.shape[-1]} token columns but pred_logits has {text_len}: "
                "build positive maps with width model.max_text_len"
            )

        cost_class = focal_token_cost(prob, self.focal_alpha, self.focal_gamma) @ normalize_rows(tgt_maps).T
        cost_bbox = torch.cdist(out_boxes, tgt_boxes, p=1)
        cost_giou = -generalized_box_iou(
            box_convert(out_boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy")
        )
        cost = self.cost_class * cost_class + self.cost_bbox * cost_bbox + self.cost_giou * cost_giou
        # A NaN/Inf from a degenerate predicted box must not abort the whole batch's assignment.
        cost = torch.nan_to_num(cost, nan=0.0, posinf=0.0, neginf=0.0)
        return cost.view(batch, num_queries, -1)

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Per image, (query indices, box indices) of the matched pairs: min(Q, N) pairs, int64 on CPU.

        outputs: `pred_logits` [B, Q, L], `pred_boxes` [B, Q, 4] normalised cxcywh.
        targets: per image `boxes` [N, 4] normalised cxcywh and `positive_map` [N, L].
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(
                f"{len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]} images: pass one per image"
            )
        cost = self.cost_matrix(outputs, targets).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        indices = []
        for image, block in enumerate(cost.split(sizes, dim=-1)):
            rows, cols = linear_sum_assignment(block[image].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
