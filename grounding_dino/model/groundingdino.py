"""The Grounding DINO detector: backbone + BERT -> feature enhancer -> language-guided queries -> decoder -> heads."""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import Joiner
from .head import ContrastiveEmbed, parse_log_scale
from .text import CaptionTokenizer, build_bert, resolve_text_encoder
from .transformer import Transformer
from .utils import MLP, inverse_sigmoid


class GroundingDINO(nn.Module):
    """Parameter names follow the official IDEA-Research model (see checkpoint.py for the other layouts)."""

    def __init__(self, cfg, backbone: Joiner, activation_checkpoint: bool = False):
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.max_text_len = cfg.max_text_len
        self.aux_loss = cfg.aux_loss
        folder = resolve_text_encoder(cfg.text_encoder_type)
        self.tokenizer = CaptionTokenizer(folder, cfg.max_text_len)
        self.backbone = backbone
        self.bert = build_bert(folder)
        self.feat_map = nn.Linear(self.bert.config.hidden_size, d)
        self.input_proj = self._input_proj(backbone[0].num_channels, cfg.num_feature_levels, d)
        log_scale = parse_log_scale(cfg.log_scale)
        self.transformer = Transformer(cfg, log_scale, activation_checkpoint)
        # One box head and one classification head, shared by every decoder layer (and registered under each).
        bbox_embed = MLP(d, d, 4, 3)
        class_embed = ContrastiveEmbed(cfg.max_text_len, log_scale, cfg.class_embed_bias)
        self.bbox_embed = nn.ModuleList([bbox_embed] * cfg.dec_layers)
        self.class_embed = nn.ModuleList([class_embed] * cfg.dec_layers)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed
        self.reset_parameters()
        self.train()  # a backbone built frozen (train_backbone: false) starts in eval mode

    @staticmethod
    def _input_proj(channels: List[int], num_levels: int, d: int) -> nn.ModuleList:
        if num_levels < len(channels):
            raise ValueError(f"model.num_feature_levels {num_levels} is smaller than the {len(channels)} backbone "
                             f"stages in model.return_interm_indices.")
        projs = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in channels]
        in_channels = channels[-1]
        for _ in range(num_levels - len(channels)):
            projs.append(nn.Sequential(nn.Conv2d(in_channels, d, kernel_size=3, stride=2, padding=1),
                                       nn.GroupNorm(32, d)))
            in_channels = d
        return nn.ModuleList(projs)

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.feat_map.weight)
        nn.init.zeros_(self.feat_map.bias)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        nn.init.zeros_(self.bbox_embed[0].layers[-1].weight)
        nn.init.zeros_(self.bbox_embed[0].layers[-1].bias)

    def train(self, mode: bool = True):
        """Training mode, except for submodules whose parameters are all frozen (train.freeze, or a backbone that does
        not train): those stay in eval mode. A frozen part is then the fixed function inference uses: a frozen text
        encoder applies no dropout and a frozen backbone's norm layers keep their statistics. It also saves the
        frozen encoder's dropout masks."""
        super().train(mode)
        if mode:
            _eval_frozen(self)
        return self

    def encode_text(self, text: Dict[str, Tensor]):
        """BERT over the caption with the sub-sentence mask and phrase positions, projected to hidden_dim."""
        hidden = self.bert(
            input_ids=text["input_ids"],
            attention_mask=text["text_token_mask"][:, None],
            token_type_ids=text["token_type_ids"],
            position_ids=text["position_ids"],
        ).last_hidden_state
        return self.feat_map(hidden)

    def _multi_level(self, images: Tensor, pixel_mask: Tensor):
        features, poss = self.backbone(images, pixel_mask)
        srcs = [proj(f) for proj, (f, _) in zip(self.input_proj, features)]
        masks = [m for _, m in features]
        for level in range(len(srcs), len(self.input_proj)):
            src = self.input_proj[level](features[-1][0] if level == len(features) else srcs[-1])
            mask = F.interpolate(pixel_mask[None].float(), size=src.shape[-2:])[0].bool()
            srcs.append(src)
            masks.append(mask)
            poss.append(self.backbone[1](mask).to(src.dtype))
        return srcs, masks, poss

    def forward(self, images: Tensor, pixel_mask: Tensor, text: Dict[str, Tensor],
                encoded_text: Optional[Tensor] = None) -> Dict:
        """images [B,3,H,W]; pixel_mask [B,H,W] True on padding (None = no padding); text from self.tokenizer;
        encoded_text: encode_text(text) computed beforehand (a fixed-vocabulary export bakes it in)."""
        # Exported graphs take no pixel mask, so they never pay for padding masks (nor evaluate this test).
        padded = pixel_mask is not None and bool(pixel_mask.any())
        if pixel_mask is None:
            pixel_mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        text_valid = text["attention_mask"].bool()
        if text_valid.shape[1] > self.max_text_len:
            raise ValueError(f"text has {text_valid.shape[1]} tokens; model.max_text_len is {self.max_text_len}.")
        encoded = self.encode_text(text) if encoded_text is None else encoded_text
        srcs, masks, poss = self._multi_level(images, pixel_mask)
        out = self.transformer(srcs, masks, poss, encoded, text_valid, text["text_token_mask"], text["position_ids"],
                               padded)
        text_out = out["text"]
        logits = [self.class_embed[i](h, text_out, text_valid) for i, h in enumerate(out["hidden"])]
        boxes = [(self.bbox_embed[i](h) + inverse_sigmoid(ref)).sigmoid()
                 for i, (h, ref) in enumerate(zip(out["hidden"], out["references"]))]
        result = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "text_mask": F.pad(text_valid, (0, self.max_text_len - text_valid.shape[1]), value=False),
        }
        if self.aux_loss:
            result["aux_outputs"] = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        if "enc_hidden" in out:
            enc_logits = self.transformer.enc_out_class_embed(out["enc_hidden"], text_out, text_valid)
            result["enc_outputs"] = {"pred_logits": enc_logits, "pred_boxes": out["enc_boxes"]}
        return result

    def forward_export(self, inputs: Tensor, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                       token_type_ids: Tensor, text_token_mask: Tensor):
        """The 6-input ONNX contract: no pixel mask, text masks computed outside the graph."""
        text = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "token_type_ids": token_type_ids, "text_token_mask": text_token_mask}
        out = self.forward(inputs, None, text)
        return out["pred_logits"], out["pred_boxes"]


def _eval_frozen(module: nn.Module) -> None:
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _eval_frozen(child)
