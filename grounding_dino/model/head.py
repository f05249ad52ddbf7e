"""Contrastive classification head: a query's logit for a token is their dot product (optionally scaled, biased)."""
import math
from typing import Optional

import torch
from torch import Tensor, nn

# A bias of -log((1-p)/p) makes every token start at probability p = 0.01, as focal-loss detectors do.
PRIOR_PROB = 0.01


def parse_log_scale(log_scale: Optional[str]):
    """None/'none' -> None; 'auto' -> 'auto'; a number (string or float) -> float. Anything else is an error."""
    if log_scale is None or (isinstance(log_scale, str) and log_scale.lower() in ("none", "null", "")):
        return None
    if isinstance(log_scale, str) and log_scale.lower() == "auto":
        return "auto"
    try:
        return float(log_scale)
    except (TypeError, ValueError):
        raise ValueError(f"model.log_scale: '{log_scale}' is not null, 'auto' or a number such as '0.0'.") from None


class ContrastiveEmbed(nn.Module):
    """logits[b,q,t] = <query, text token>; tokens that are padding or past the prompt get -inf; width max_text_len.

    log_scale 'auto' divides by sqrt(hidden) like attention logits; a number makes a learnable log-scale
    (logits x exp(s)); `bias` adds a learnable scalar initialised to -log(99). Both keep the first focal losses sane.
    """

    def __init__(self, max_text_len: int, log_scale=None, bias: bool = False):
        super().__init__()
        self.max_text_len = max_text_len
        self.auto_scale = log_scale == "auto"
        self.log_scale = nn.Parameter(torch.tensor([log_scale])) if isinstance(log_scale, float) else None
        self.bias = nn.Parameter(torch.tensor([-math.log((1 - PRIOR_PROB) / PRIOR_PROB)])) if bias else None

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        """x [B,Q,C], text [B,T,C], text_mask [B,T] True on valid tokens -> [B,Q,max_text_len]."""
        logits = x @ text.transpose(-1, -2)
        if self.log_scale is not None:
            logits = logits * self.log_scale.exp()
        elif self.auto_scale:
            logits = logits / math.sqrt(x.shape[-1])
        if self.bias is not None:
            logits = logits + self.bias
        logits = logits.masked_fill(~text_mask[:, None, :], float("-inf"))
        pad = self.max_text_len - logits.shape[-1]
        return nn.functional.pad(logits, (0, pad), value=float("-inf"))
