"""Weight decay groups: exactly the parameters with two or more dimensions are decayed."""

from __future__ import annotations

import torch
from train_helpers import tiny_model

from memlm.model import LanguageModel
from memlm.train.optim import make_optimizer, param_groups


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    model = LanguageModel(tiny_model().replace(bias=True, **{"position.kind": "learned"}))
    decayed, plain = param_groups(model, weight_decay=0.1)
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}  # tied weights appear once, as embed.weight
    assert {names[id(p)] for p in decayed["params"]} == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert {names[id(p)] for p in plain["params"]} == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert "embed.weight" in {names[id(p)] for p in decayed["params"]}
    assert "positions.table.weight" in {names[id(p)] for p in decayed["params"]}
    assert any(n.endswith(".bias") for n in (names[id(p)] for p in plain["params"]))
    every = [id(p) for group in (decayed, plain) for p in group["params"]]
    assert sorted(every) == sorted({id(p) for p in model.parameters()})  # each parameter exactly once


def test_optimizer_is_adamw_with_the_given_hyperparameters():
    model = LanguageModel(tiny_model())
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.95) and g["lr"] == 1e-3 and g["fused"] for g in optimizer.param_groups)
