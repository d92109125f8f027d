"""Measuring frozen features: a linear probe (logistic regression) and image->text retrieval R@1."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["linear_probe", "retrieval_r1"]


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4) -> float:
    """Accuracy of a logistic-regression probe trained on frozen features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (test_x - mean) / std
    n_cls = int(max(train_y.max(), test_y.max())) + 1
    probe = nn.Linear(tx.shape[1], n_cls)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():  # callers may hold no_grad for the frozen features
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(probe(tx), train_y).backward()
            opt.step()
    with torch.no_grad():
        return float((probe(vx).argmax(-1) == test_y).float().mean())


def retrieval_r1(img: Tensor, txt: Tensor) -> float:
    """Image->text R@1: share of images whose own caption is the most similar."""
    sim = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    return float((sim.argmax(-1) == torch.arange(len(img))).float().mean())
