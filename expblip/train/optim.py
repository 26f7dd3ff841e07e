"""Parameter groups and the learning-rate schedule (AdamW, linear warm-up, cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from expblip.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (biases, norms, embeddings of queries).

    The released Exp-BLIP code decayed every parameter, LayerNorms and biases included; we do not.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        flat = param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or name.endswith("query_tokens")
        (no_decay if flat else decay).append(param)
    if not decay and not no_decay:
        raise ValueError("no parameter trains: check model.freeze_* and train.stage")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # torch's AdamW: DeepSpeed's FusedAdam/CPUAdam would JIT-compile for ~42 s on a CPU machine
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate after `step` optimiser steps: linear from warmup_start_lr to lr, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / max(1, cfg.warmup_steps)
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """A LambdaLR (multiplier of the peak lr) whose state DeepSpeed checkpoints with the engine."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)
