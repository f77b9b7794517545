"""Warm-up + cosine schedule as a pure function of the step; AdamW parameter groups."""

import math

import pytest

from mecefo.config import TrainConfig
from mecefo.models import build_model
from mecefo.optim import build_optimizer, lr_at


def test_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    after = [lr_at(s, cfg) for s in range(10, 111)]
    assert after == sorted(after, reverse=True)


def test_no_weight_decay_on_norms():
    cfg = TrainConfig(weight_decay=0.1)
    model = build_model(cfg)
    decay, no_decay = build_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
