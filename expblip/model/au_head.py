"""The tiny world's 'vision' stage, shared by every family: a random ViT earns its starting point by learning to see
AUs through a linear multi-label head (DESIGN.md). Targets from labels, and the loss that ignores unlabelled faces."""

from __future__ import annotations

import torch
from torch import nn


def au_targets(labels: list[dict], aus: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Multi-label targets [B, A] and a mask [B, A] that is 0 for samples without AU labels."""
    targets = torch.tensor([[float(a in (lab.get("aus") or ())) for a in aus] for lab in labels])
    mask = torch.tensor([[float(lab.get("aus") is not None)] * len(aus) for lab in labels])
    return {"targets": targets, "target_mask": mask}


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy [B, A] over the labelled entries: unlabelled samples count for nothing."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (loss * target_mask).sum() / target_mask.sum().clamp(min=1)
