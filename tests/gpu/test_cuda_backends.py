"""GPU-only: flex and sdpa against eager with gradients, float32 and bf16 (run on the device).

Prints a table of max differences (`pytest -s tests/gpu`); skipped on machines without CUDA.
"""

import pytest
import torch

import memlm
from memlm.state import allow_memory_recompiles

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {
    "t5": {"position.kind": "t5"},
    "tupe": {"position.kind": "tupe"},
    "tupe+t5": {"position.kind": "tupe", "position.tupe_t5": True},
    "rope": {"position.kind": "rope"},
    "xpos": {"position.kind": "xpos"},
    "forgetful(rope)": {"position.kind": "rope", "attention.forgetful": 0.3},
    "forgetful(t5)": {"position.kind": "t5", "attention.forgetful": 0.3},
    "persistent(xpos)": {"position.kind": "xpos", "memory.persistent.vectors": 8},
    "span(rope)": {"position.kind": "rope", "memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.2},
    "span band(rope, persistent)": {"position.kind": "rope", "memory.adaptive_span.enabled": True,
                                    "memory.adaptive_span.init": 0.2, "memory.adaptive_span.gradient": "band",
                                    "memory.persistent.vectors": 8},
}
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 3e-2}  # relative L2 error
RESULTS = []


def run(backend, case, dtype, ids):
    torch.manual_seed(0)
    model = memlm.build("seed-tiny", layers=2, width=128, seq_len=256, max_positions=256,
                        **{"attention.heads": 4, "attention.kv_heads": 2, "attention.backend": backend},
                        **CASES[case]).cuda().train()
    torch.manual_seed(1)  # the same forgetful-masking draw for every backend
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(ids, targets=ids)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.float().detach(), grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_backend_matches_eager_with_gradients(backend, case, dtype):
    ids = torch.randint(0, 256, (4, 256), generator=torch.Generator().manual_seed(2)).cuda()
    ref_logits, ref_grads = run("eager", case, dtype, ids)
    logits, grads = run(backend, case, dtype, ids)
    assert grads.keys() == ref_grads.keys()
    logit_err = rel(logits, ref_logits)
    grad_err = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
    worst = max(ref_grads, key=lambda n: rel(grads[n], ref_grads[n]))
    max_abs = (logits - ref_logits).abs().max().item()
    RESULTS.append((backend, case, str(dtype).split(".")[-1], max_abs, logit_err, grad_err, worst))
    print(f"\n{backend:5s} {case:16s} {str(dtype):15s} logits max|d|={max_abs:.2e} rel={logit_err:.2e} "
          f"grads max rel={grad_err:.2e} ({worst})")
    assert logit_err < TOLERANCE[dtype]
    assert grad_err < TOLERANCE[dtype] * 2


def test_compiled_flex_trains_over_a_memory_that_grows():
    """The race's xl4-xpos-knn with attention dropout 0 (auto picks flex) compiled for training: its
    memory grows over the first segments and a reset masks a row's memory, so the flex kernel's
    k_offset becomes a symbolic size that Inductor could not lower in a score_mod (torch 2.11:
    'ShapeAsConstantBuffer' object has no attribute 'dtype'). Losses and gradients match eager."""
    overrides = {"layers": 2, "dropout": 0.0, "feedforward.dropout": 0.0, "attention.dropout": 0.0,
                 "memory.train_reset": 0.0, "memory.knn.layers": [1]}
    torch._dynamo.reset()
    allow_memory_recompiles()
    losses = {}
    for backend in ("eager", "auto"):
        torch.manual_seed(0)
        model = memlm.build("xl4-xpos-knn-tiny", **overrides, **{"attention.backend": backend}).cuda().train()
        step = torch.compile(model) if backend == "auto" else model
        torch.manual_seed(2)
        state = model.init_state(2)
        losses[backend] = []
        for segment in range(6):
            ids = torch.randint(0, 256, (2, model.config.seq_len), device="cuda")
            out = step(ids, targets=ids, state=state)
            out.loss.backward()
            losses[backend].append(out.loss.item())
            state = out.state.detach()
            if segment == 3:
                state = state.reset(torch.tensor([True, False], device="cuda"))
        losses[backend].append(sum(p.grad.float().norm().item() for p in model.parameters() if p.grad is not None))
    print(f"\ncompiled flex over a growing memory: {losses}")
    torch.testing.assert_close(torch.tensor(losses["auto"]), torch.tensor(losses["eager"]), rtol=2e-3, atol=0)
