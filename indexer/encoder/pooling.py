"""Token vectors -> one vector per text: masked mean pooling (what sentence-transformers models such as
all-MiniLM-L6-v2 are trained for) or the ``[CLS]`` token's vector."""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the token vectors, padding excluded (no mask: a batch without padding)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def cls_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The first ([CLS]) token's vector."""
    return hidden[:, 0]


POOLERS = {"mean": mean_pool, "cls": cls_pool}
