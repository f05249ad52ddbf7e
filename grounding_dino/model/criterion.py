"""Set criterion: Hungarian-matched token focal loss, L1 and GIoU on the final layer, every decoder layer and the
encoder proposals.

Classification is per text token. A matched query's target row is its phrase's positive map, every other query's
row is all zeros, and only valid tokens (`text_mask`) count. Every term is divided by the number of ground-truth
boxes in the global batch, so each image contributes in proportion to its boxes whatever the rank count.

The encoder-output term (`_interm`) is computed on the top-k proposals exactly as the model returns them, with
their graph intact: that is the only signal that trains the proposal head (`enc_output`, `enc_output_norm`,
`enc_out_bbox_embed`). Hugging Face detaches them and the head never learns.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from .matcher import HungarianMatcher

Indices = List[Tuple[Tensor, Tensor]]
# Loss type (model.loss_types) -> the loss names it produces.
LOSS_TERMS = {"labels": ("loss_ce",), "boxes": ("loss_bbox", "loss_giou")}


def _check_loss_types(losses: Sequence[str]) -> None:
    unknown = sorted(set(losses) - set(LOSS_TERMS))
    if unknown or not losses:
        raise ValueError(f"model.loss_types is {list(losses)}; use a non-empty subset of {sorted(LOSS_TERMS)}")


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise RetinaNet focal loss on logits (no reduction); alpha < 0 disables the class balance."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss


def _matched(indices: Indices) -> Tuple[Tensor, Tensor]:
    """(image index, query index) of every matched query in the batch."""
    image = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    query = torch.cat([src for src, _ in indices])
    return image, query


def num_boxes_global(targets: Sequence[Dict[str, Tensor]], device: torch.device) -> float:
    """Mean boxes per rank (at least 1): the normaliser that keeps the loss scale rank-count independent."""
    count = torch.tensor([float(sum(len(t["boxes"]) for t in targets))], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return max(count.item(), 1.0)


class SetCriterion(nn.Module):
    """Computes the unweighted Grounding DINO losses; `weight_dict` holds their coefficients.

    Loss names: `loss_ce`, `loss_bbox`, `loss_giou` for the final layer, the same with `_0`.. `_{n-2}` for the
    intermediate decoder layers, and with `_interm` for the encoder proposals.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        losses: Sequence[str] = ("labels", "boxes"),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        interm_box_loss: bool = True,
    ):
        super().__init__()
        _check_loss_types(losses)
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.interm_box_loss = interm_box_loss

    @classmethod
    def from_config(cls, model_cfg) -> "SetCriterion":
        """Build matcher, loss list and weights from a `grounding_dino.config.ModelConfig`."""
        if model_cfg.use_dn and model_cfg.dn_number > 0:
            raise ValueError(
                f"model.dn_number is {model_cfg.dn_number} but contrastive denoising is not implemented: "
                "set model.dn_number to 0 (the TAO default) or model.use_dn to false"
            )
        _check_loss_types(model_cfg.loss_types)
        coef = {"loss_ce": model_cfg.cls_loss_coef, "loss_bbox": model_cfg.bbox_loss_coef,
                "loss_giou": model_cfg.giou_loss_coef}
        base = {term: coef[term] for loss in model_cfg.loss_types for term in LOSS_TERMS[loss]}
        weight_dict = dict(base)
        if model_cfg.aux_loss:
            for layer in range(model_cfg.dec_layers - 1):
                weight_dict.update({f"{k}_{layer}": w for k, w in base.items()})
        if model_cfg.two_stage_type != "no":
            interm_losses = [n for n in model_cfg.loss_types if n != "boxes" or not model_cfg.no_interm_box_loss]
            weight_dict.update({f"{term}_interm": coef[term] * model_cfg.interm_loss_coef
                                for loss in interm_losses for term in LOSS_TERMS[loss]})
        return cls(
            HungarianMatcher.from_config(model_cfg),
            weight_dict,
            losses=model_cfg.loss_types,
            focal_alpha=model_cfg.focal_alpha,
            focal_gamma=model_cfg.focal_gamma,
            interm_box_loss=not model_cfg.no_interm_box_loss,
        )

    def loss_labels(self, outputs, targets, indices, text_mask: Tensor, num_boxes: float) -> Dict[str, Tensor]:
        logits = outputs["pred_logits"]
        target_rows = torch.zeros_like(logits)
        image, query = _matched(indices)
        maps = torch.cat([t["positive_map"][tgt] for t, (_, tgt) in zip(targets, indices)])
        target_rows[image, query] = maps.to(target_rows)
        # Padding tokens hold -inf logits; select valid tokens before the loss so no inf enters the graph.
        valid = text_mask[:, None, :].expand_as(logits)
        loss = sigmoid_focal_loss(logits[valid], target_rows[valid], self.focal_alpha, self.focal_gamma)
        return {"loss_ce": loss.sum() / num_boxes}

    def loss_boxes(self, outputs, targets, indices, text_mask: Tensor, num_boxes: float) -> Dict[str, Tensor]:
        image, query = _matched(indices)
        src = outputs["pred_boxes"][image, query]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="none").sum() / num_boxes
        loss_giou = generalized_box_iou_loss(
            box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"), reduction="sum"
        ) / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    LOSSES: Dict[str, Callable] = {"labels": loss_labels, "boxes": loss_boxes}

    def _set_losses(self, outputs, targets, text_mask, num_boxes, losses: Sequence[str]) -> Dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        device = outputs["pred_logits"].device
        indices = [(src.to(device), tgt.to(device)) for src, tgt in indices]
        out: Dict[str, Tensor] = {}
        for name in losses:
            out.update(self.LOSSES[name](self, outputs, targets, indices, text_mask, num_boxes))
        return out

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Unweighted losses. `outputs` is the model's dict; `targets` one dict per image with `boxes` [N, 4]
        (normalised cxcywh) and `positive_map` [N, L]; images with no boxes are allowed."""
        text_mask = outputs["text_mask"].bool()
        num_boxes = num_boxes_global(targets, outputs["pred_logits"].device)
        losses = self._set_losses(outputs, targets, text_mask, num_boxes, self.losses)
        for layer, aux in enumerate(outputs.get("aux_outputs") or []):
            layer_losses = self._set_losses(aux, targets, text_mask, num_boxes, self.losses)
            losses.update({f"{k}_{layer}": v for k, v in layer_losses.items()})
        if outputs.get("enc_outputs") is not None:
            interm = [n for n in self.losses if self.interm_box_loss or n != "boxes"]
            layer_losses = self._set_losses(outputs["enc_outputs"], targets, text_mask, num_boxes, interm)
            losses.update({f"{k}_interm": v for k, v in layer_losses.items()})
        return losses


def weighted_total(losses: Dict[str, Tensor], weight_dict: Dict[str, float]) -> Tensor:
    """Sum of losses times their coefficients. A loss without a coefficient is an error, never silently dropped."""
    missing = sorted(set(losses) - set(weight_dict))
    if missing:
        raise KeyError(
            f"losses {missing} have no weight in weight_dict: the model's outputs (aux_outputs count, enc_outputs) "
            "do not match model.dec_layers / aux_loss / two_stage_type used to build the criterion"
        )
    return sum(losses[k] * weight_dict[k] for k in losses)
