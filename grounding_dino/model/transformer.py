"""The official `transformer`: flatten the levels, enhance image and text, select queries by language, decode."""
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from .decoder import Decoder
from .encoder import FeatureEnhancer
from .head import ContrastiveEmbed
from .ms_deform_attn import MSDeformAttn
from .utils import MLP


def encoder_output_proposals(memory: Tensor, padding_mask: Tensor, spatial_shapes: List[Tuple[int, int]]):
    """One proposal per image token: its cell centre with side 0.05 * 2^level, in inverse-sigmoid space.

    Proposals on padding or too close to the border (outside 0.01..0.99) become +inf and their memory is zeroed,
    so they never win the top-k unless nothing else is left.
    """
    batch = memory.shape[0]
    proposals, start = [], 0
    for level, (h, w) in enumerate(spatial_shapes):
        mask = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.arange(h, dtype=memory.dtype, device=memory.device),  # not linspace: see encoder_reference_points
            torch.arange(w, dtype=memory.dtype, device=memory.device),
            indexing="ij",
        )
        grid = torch.stack([grid_x, grid_y], -1)
        scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
        grid = (grid[None].expand(batch, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
        proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    unusable = padding_mask[..., None] | ~valid
    proposals = proposals.masked_fill(unusable, float("inf"))
    memory = memory.masked_fill(unusable, 0.0)
    return memory, proposals


class Transformer(nn.Module):
    def __init__(self, cfg, log_scale, activation_checkpoint: bool = False):
        super().__init__()
        d = cfg.hidden_dim
        self.num_queries = cfg.num_queries
        self.two_stage = cfg.two_stage_type == "standard"
        self.encoder = FeatureEnhancer(cfg.enc_layers, d, cfg.nheads, cfg.dim_feedforward, cfg.dropout_ratio,
                                       cfg.fusion_droppath, cfg.num_feature_levels, cfg.enc_n_points,
                                       activation_checkpoint)
        self.decoder = Decoder(cfg.dec_layers, d, cfg.dim_feedforward, cfg.dropout_ratio, cfg.num_feature_levels,
                               cfg.nheads, cfg.dec_n_points, activation_checkpoint)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, d))
        self.tgt_embed = nn.Embedding(cfg.num_queries, d) if cfg.embed_init_tgt else None
        if self.two_stage:
            self.enc_output = nn.Linear(d, d)
            self.enc_output_norm = nn.LayerNorm(d)
            self.enc_out_bbox_embed = MLP(d, d, 4, 3)
            self.enc_out_class_embed = ContrastiveEmbed(cfg.max_text_len, log_scale, cfg.class_embed_bias)
        else:
            if not cfg.embed_init_tgt:
                raise ValueError("model.two_stage_type 'no' needs model.embed_init_tgt: true (learned queries).")
            self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)
        self.reset_parameters()

    def reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        if self.tgt_embed is not None:
            nn.init.normal_(self.tgt_embed.weight)
        if self.two_stage:
            nn.init.zeros_(self.enc_out_bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.enc_out_bbox_embed.layers[-1].bias)

    def forward(self, srcs: List[Tensor], masks: List[Tensor], poss: List[Tensor], text: Tensor, text_valid: Tensor,
                text_self_mask: Tensor, text_position_ids: Tensor, padded: bool = True) -> Dict:
        """srcs/poss [B,C,H,W] per level, masks [B,H,W] True on padding; text [B,T,C], text_valid [B,T].
        padded=False says the masks are all False: attention then skips them (masking nothing is exact, and on CPU
        each mask is a pass over every image token in every layer)."""
        spatial_shapes = [tuple(src.shape[-2:]) for src in srcs]
        src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flat = torch.cat([m.flatten(1) for m in masks], 1)
        pos_flat = torch.cat([p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                              for lvl, p in enumerate(poss)], 1)
        valid_ratios = torch.stack([_valid_ratio(m) for m in masks], 1).to(src_flat.dtype)
        text_padding = ~text_valid
        attention_padding = mask_flat if padded else None
        memory, text = self.encoder(src_flat, pos_flat, spatial_shapes, valid_ratios, attention_padding, text,
                                    text_padding, text_self_mask, text_position_ids)
        batch = memory.shape[0]
        out = {"text": text}
        if self.two_stage:
            object_memory, proposals = encoder_output_proposals(memory, mask_flat, spatial_shapes)
            object_memory = self.enc_output_norm(self.enc_output(object_memory))
            scores = self.enc_out_class_embed(object_memory, text, text_valid).max(-1)[0]
            if scores.shape[1] < self.num_queries:
                raise ValueError(f"model.num_queries {self.num_queries} exceeds the {scores.shape[1]} image tokens of "
                                 f"this input; use larger images or fewer queries.")
            topk = _top_indices(scores, self.num_queries)
            selected_memory = torch.gather(object_memory, 1, topk[..., None].expand(-1, -1, object_memory.shape[-1]))
            # Only the selected tokens' boxes are ever used, so the box head runs on those alone (the official model
            # runs it on every image token first; the result is the same).
            selected_proposals = torch.gather(proposals, 1, topk[..., None].expand(-1, -1, 4))
            selected_coords = self.enc_out_bbox_embed(selected_memory) + selected_proposals
            reference = selected_coords.detach().sigmoid()
            tgt = (self.tgt_embed.weight[None].expand(batch, -1, -1) if self.tgt_embed is not None
                   else selected_memory.detach())
            out["enc_hidden"], out["enc_boxes"] = selected_memory, selected_coords.sigmoid()
        else:
            reference = self.refpoint_embed.weight[None].expand(batch, -1, -1).sigmoid()
            tgt = self.tgt_embed.weight[None].expand(batch, -1, -1)
        out["hidden"], out["references"] = self.decoder(tgt, reference, memory, spatial_shapes, valid_ratios,
                                                        attention_padding, text, text_padding)
        return out


def _valid_ratio(mask: Tensor) -> Tensor:
    """Share of each image's (width, height) that is not padding on one level: [B, 2]."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


def _top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k best scores per row, ties broken by the lower index as ONNX TopK specifies.

    Zeroed border proposals tie exactly; torch.topk orders ties arbitrarily, so eager runs use a stable sort and an
    exported graph (where a stable sort cannot be expressed) uses TopK, and both pick the same queries.
    """
    if torch.onnx.is_in_onnx_export():
        return torch.topk(scores, k, dim=1)[1]
    return scores.sort(dim=1, descending=True, stable=True)[1][:, :k]
