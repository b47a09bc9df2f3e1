"""AdaptiveSpan (memlm.memory.adaptive_span) against the paper's formulas, computed by hand in float64."""

import math

import pytest
import torch

from memlm.memory.adaptive_span import AdaptiveSpan
from memlm.nn.kernels import eager_attention
from tests.conftest import build_tiny, run_segments


def soft_mask(z: float, ramp: int, x: float) -> float:
    """m_z(x) = clamp((R + z - x) / R, 0, 1) (arXiv 1905.07799, eq. 2), in Python floats."""
    return min(max((ramp + z - x) / ramp, 0.0), 1.0)


def brute_limit(spans: list[float], span_max: int, ramp: int) -> int:
    """The smallest integer distance from which every head's mask is 0, capped at span_max + ramp."""
    x = 0
    while any(soft_mask(z, ramp, x) > 0 for z in spans):
        x += 1
    return min(span_max + ramp, x)


def brute_bias(spans: list[float], ramp: int, q_len: int, k_len: int, k_offset: int) -> torch.Tensor:
    """The additive log-mask (H, Tq, Tk) entry by entry: query i at position i, key j at k_offset + j,
    distance max(i - key position, 0); log m, or -inf where m = 0."""
    out = torch.empty(len(spans), q_len, k_len, dtype=torch.float64)
    for h, z in enumerate(spans):
        for i in range(q_len):
            for j in range(k_len):
                m = soft_mask(z, ramp, max(i - (k_offset + j), 0))
                out[h, i, j] = math.log(m) if m > 0 else float("-inf")
    return out


def with_spans(spans, span_max, ramp):
    module = AdaptiveSpan(heads=len(spans), span_max=span_max, ramp=ramp, init=0.0, gradient="dense")
    with torch.no_grad():
        module.span.copy_(torch.tensor(spans))
    module.clamp_()
    return module


@pytest.mark.parametrize("heads,span_max,ramp,init", [(3, 8, 2, 0.5), (2, 16, 4, 0.25), (1, 10, 3, 1.0),
                                                      (4, 12, 5, 0.0), (2, 20, 2, 0.375)])
def test_initial_span_and_limit_follow_their_definitions(heads, span_max, ramp, init):
    module = AdaptiveSpan(heads=heads, span_max=span_max, ramp=ramp, init=init, gradient="dense")
    expected_span = init * span_max  # init is a fraction of span_max, the span is stored in positions
    assert module.span.shape == (heads,)
    assert module.span.tolist() == [expected_span] * heads
    assert isinstance(module.limit, int)
    assert module.limit == brute_limit([expected_span] * heads, span_max, ramp)
    module.clamp_()  # nothing to clamp: the limit read from the parameter is the same
    assert module.limit == brute_limit([expected_span] * heads, span_max, ramp)


@pytest.mark.parametrize("spans,span_max,ramp", [([0.0, 5.5, 20.0], 20, 4), ([1.0, 3.0, 2.0, 4.5], 16, 2),
                                                 ([0.0, 0.0], 8, 3), ([7.25], 8, 1)])
def test_mask_equals_the_formula_at_every_distance(spans, span_max, ramp):
    module = with_spans(spans, span_max, ramp)
    distance = torch.arange(0, span_max + 2 * ramp + 2, dtype=torch.float32) * 0.5  # integer and half distances
    m = module.mask(distance[None, :])
    assert m.shape == (len(spans), 1, distance.numel())
    expected = torch.tensor([[[soft_mask(z, ramp, x) for x in distance.tolist()]] for z in spans],
                            dtype=torch.float64)
    torch.testing.assert_close(m.double(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spans,ramp,q_len,k_len,k_offset", [
    ([0.0, 2.5, 6.0], 2, 4, 10, -6),   # memory before the segment: distances up to 9
    ([1.0, 0.0], 3, 5, 5, 0),          # keys of the segment itself: distance 0 on the diagonal, future keys
    ([3.75, 8.0], 4, 3, 7, -4),
])
def test_bias_is_the_log_of_the_mask_for_every_query_and_key(spans, ramp, q_len, k_len, k_offset):
    module = with_spans(spans, span_max=8, ramp=ramp)
    bias = module(q_len, k_len, k_offset, torch.device("cpu"))
    expected = brute_bias(spans, ramp, q_len, k_len, k_offset)
    assert bias.shape == expected.shape
    assert torch.equal(torch.isneginf(bias), torch.isneginf(expected))
    finite = torch.isfinite(expected)
    assert torch.isfinite(bias[finite]).all()
    torch.testing.assert_close(bias[finite].double(), expected[finite], atol=1e-6, rtol=0)


def test_bias_gradient_is_one_over_ramp_inside_the_ramp_and_never_nan():
    """d m / d z = 1 / R where 0 < m < 1 and 0 elsewhere; exp(bias) = m, so the gradient of
    sum(exp(bias)) by head h is (number of its keys inside the ramp) / R, even with masked keys.
    Spans off the integers keep every distance off the ramp's ends, where the gradient is a convention."""
    spans, ramp = [0.5, 2.25, 5.75], 2
    module = with_spans(spans, span_max=8, ramp=ramp)
    bias = module(4, 12, -8, torch.device("cpu"))
    bias.exp().sum().backward()
    inside = []
    for z in spans:
        count = 0
        for i in range(4):
            for j in range(12):
                if 0 < soft_mask(z, ramp, max(i - (-8 + j), 0)) < 1:
                    count += 1
        inside.append(count / ramp)
    assert not torch.isnan(module.span.grad).any()
    torch.testing.assert_close(module.span.grad.double(), torch.tensor(inside, dtype=torch.float64))


def test_bias_is_built_on_the_device_asked_for():
    module = AdaptiveSpan(heads=2, span_max=8, ramp=2, init=0.5, gradient="dense").to("meta")  # not the default device
    bias = module(3, 5, -2, torch.device("meta"))
    assert bias.device.type == "meta" and bias.shape == (2, 3, 5)


def test_penalty_is_the_mean_span_in_positions():
    spans = [0.0, 3.5, 8.0, 1.25]
    module = with_spans(spans, span_max=8, ramp=2)
    penalty = module.penalty()
    assert penalty.item() == pytest.approx(sum(spans) / len(spans))
    penalty.backward()
    assert module.span.grad.tolist() == [1 / len(spans)] * len(spans)


def test_clamp_after_an_optimizer_step_and_the_limit():
    module = with_spans([0.5, 4.0, 7.5], span_max=8, ramp=3)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    (module.span * torch.tensor([2.0, -0.75, -3.0])).sum().backward()  # steps -2, +0.75, +3
    optimizer.step()
    torch.testing.assert_close(module.span.detach(), torch.tensor([-1.5, 4.75, 10.5]))
    module.clamp_()
    expected = [min(max(z, 0.0), 8.0) for z in [-1.5, 4.75, 10.5]]
    assert module.span.tolist() == expected
    assert module.limit == brute_limit(expected, 8, 3) == 8 + 3

    with torch.no_grad():
        module.span.copy_(torch.tensor([-4.0, 2.2, 0.0]))
    module.clamp_()
    assert module.span.tolist() == pytest.approx([0.0, 2.2, 0.0])
    assert module.limit == brute_limit(module.span.tolist(), 8, 3) == math.ceil(2.2) + 3


@pytest.mark.parametrize("loaded", [[-2.0, 3.5, 50.0], [1.0, 2.25, 0.0], [-1.0, -0.5, -3.0]])
def test_loading_a_state_dict_clamps_the_spans_and_updates_the_limit(loaded):
    module = AdaptiveSpan(heads=3, span_max=10, ramp=2, init=0.5, gradient="dense")
    module.load_state_dict({"span": torch.tensor(loaded)})
    expected = [min(max(z, 0.0), 10.0) for z in loaded]
    assert module.span.tolist() == expected
    assert module.limit == brute_limit(expected, 10, 2)


def test_span_mask_equals_the_formula():
    span = AdaptiveSpan(heads=3, span_max=20, ramp=4, init=0.0, gradient="dense")
    with torch.no_grad():
        span.span.copy_(torch.tensor([0.0, 5.5, 20.0]))
    x = torch.arange(0, 30).float()
    m = span.mask(x[None, :].expand(1, -1))  # (H, 1, 30)
    for h, z in enumerate([0.0, 5.5, 20.0]):
        expected = ((4 + z - x) / 4).clamp(0, 1)
        torch.testing.assert_close(m[h, 0], expected)
    bias = span(2, 8, -6, torch.device("cpu"))  # query 0 sees keys at distances 6..0
    assert bias.shape == (3, 2, 8)
    assert bias[0, 0, 0].item() == float("-inf") and bias[2, 0, 0].item() == 0.0
    assert bias[0, 0, 3].item() == pytest.approx(torch.tensor(0.25).log().item())  # distance 3, z = 0


def test_log_mask_bias_reweights_attention_like_the_paper():
    """softmax(s + log m) == m * exp(s) / sum(m * exp(s))."""
    span = AdaptiveSpan(heads=2, span_max=8, ramp=3, init=0.3, gradient="dense")
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    out = eager_attention(q, k, v, k_offset=-2, bias=span(4, 6, -2, torch.device("cpu")))
    distance = (torch.arange(4)[:, None] - torch.arange(-2, 4)[None, :]).float()
    m = span.mask(distance.clamp_min(0)) * (distance >= 0)  # (H, 4, 6), causal
    weights = m * torch.exp((q @ k.transpose(-1, -2)) / 8 ** 0.5)[0]
    expected = (weights / weights.sum(-1, keepdim=True)) @ v[0]
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=1e-5)


def test_span_penalty_clamping_and_gradient():
    model = build_tiny(**{"memory.xl.length": 8, "memory.adaptive_span.enabled": True, "memory.adaptive_span.init": 0.25,
                     "memory.adaptive_span.penalty": 0.01}).train()
    assert model.config.span_max == 16
    ids = torch.randint(0, 256, (2, 8))
    out = model(ids, targets=ids, state=model.init_state(2))
    spans = [b.attention.span.span for b in model.blocks]
    torch.testing.assert_close(out.aux_loss, 0.01 * sum(s.mean() for s in spans))
    (out.loss + out.aux_loss).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in spans)
    with torch.no_grad():
        spans[0].copy_(torch.tensor([-3.0, 5.0, 40.0, 16.5]))
    model.after_optimizer_step()
    assert spans[0].tolist() == [0.0, 5.0, 16.0, 16.0]
    assert model.spans()[0] == [0.0, 5.0, 16.0, 16.0]
    assert model.blocks[0].attention.span.limit == 16 + 32  # span_max + ramp caps the limit


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_the_window_masks_only_keys_the_soft_mask_zeroes(backend, monkeypatch):
    """The kernels skip keys at distance >= the span's window (flex: whole blocks of them); the
    outputs equal those with no window at all, through memory rolls."""
    model = build_tiny(**{"memory.xl.length": 24, "memory.adaptive_span.enabled": True, "memory.adaptive_span.ramp": 2,
                          "attention.backend": backend}).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attention.span.span.copy_(torch.tensor([1.0, 3.0, 2.0, 4.5]))
    model.after_optimizer_step()
    assert model.blocks[0].attention.span.limit == 7  # ceil(4.5) + 2
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():  # flex has no backward on a CPU
        windowed, state, _ = run_segments(model, ids)
        assert state.layers[0].mem.shape[1] == 24  # the memory keeps its length
        monkeypatch.setattr(AdaptiveSpan, "window", lambda self: torch.tensor(10_000.0))
        unwindowed, _, _ = run_segments(model, ids)
    torch.testing.assert_close(windowed, unwindowed, atol=1e-5, rtol=0)


def test_learning_spans_never_recompiles_a_compiled_model():
    """Compiled, with the state's tensors marked static as the Trainer marks them: once the memory
    is full, spans that change every step (and with them the window) reuse the same graphs, and
    the compiled steps equal the eager ones."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = build_tiny(**{"memory.xl.length": 8, "memory.adaptive_span.enabled": True,
                          "memory.adaptive_span.ramp": 2})
    compiled = torch.compile(model, backend=counting_backend)
    ids = torch.randint(0, 256, (2, 8 * 8))
    state, eager_state = model.init_state(2), model.init_state(2)
    counts = []
    for step, spans in enumerate([0.5, 1.0, 2.0, 3.5, 5.0, 6.0, 7.5, 8.0]):
        with torch.no_grad():
            for block in model.blocks:
                block.attention.span.span.fill_(spans)
        model.after_optimizer_step()
        segment = ids[:, 8 * step:8 * step + 8]
        out = compiled(segment, targets=segment, state=state.mark_static())
        expected = model(segment, targets=segment, state=eager_state)
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=0)
        state, eager_state = out.state.detach(), expected.state.detach()
        counts.append(len(graphs))
    assert len({b.attention.span.limit for b in model.blocks}) == 1 and model.blocks[0].attention.span.limit == 10
    assert counts[2:] == [counts[2]] * 6, counts  # from the third step (memory full) on, no new graph


# ----- the spans' gradient from the ramp band alone (gradient="band") ---------------------

def test_band_attention_is_attention_over_each_heads_band_of_keys():
    """band_attention against scores written out by hand: out and lse over the keys with
    low[h] <= distance < high[h] that the query may see; out 0 and lse -inf without such keys;
    its flex form (block mask per head, run eagerly on the CPU) equals its eager form."""
    from memlm.nn.kernels import band_attention

    B, H, Hkv, Tq, Tk, D, offset = 2, 4, 2, 6, 14, 8, -8
    q, k, v = torch.randn(B, H, Tq, D), torch.randn(B, Hkv, Tk, D), torch.randn(B, Hkv, Tk, D)
    low, high = torch.tensor([0.0, 2.5, 3.0, 30.0]), torch.tensor([2.0, 5.5, 6.0, 32.0])  # head 3: no key
    key_mask = torch.ones(B, Tk, dtype=torch.bool)
    key_mask[1, :5] = False
    bias = torch.randn(H, Tq, Tk)
    out, lse = band_attention(q, k, v, k_offset=offset, low=low, high=high, bias=bias, key_mask=key_mask,
                              scale=0.3, backend="eager")
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = [j for j in range(Tk) if low[h] <= i - (offset + j) < high[h] and i - (offset + j) >= 0
                        and (key_mask[b, j] or i == offset + j)]
                if not keys:
                    assert lse[b, h, i] == float("-inf") and torch.all(out[b, h, i] == 0)
                    continue
                kv = h // (H // Hkv)
                scores = torch.stack([q[b, h, i] @ k[b, kv, j] * 0.3 + bias[h, i, j] for j in keys])
                weights = scores.softmax(0)
                torch.testing.assert_close(lse[b, h, i], scores.logsumexp(0), atol=1e-5, rtol=0)
                torch.testing.assert_close(out[b, h, i], sum(w * v[b, kv, j] for w, j in zip(weights, keys)),
                                           atol=1e-5, rtol=0)
    flex_out, flex_lse = band_attention(q, k, v, k_offset=offset, low=low, high=high, bias=bias, key_mask=key_mask,
                                        scale=0.3, backend="flex")
    torch.testing.assert_close(flex_out, out, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex_lse, lse, atol=1e-5, rtol=0)


def span_model(gradient: str, **extra):
    model = build_tiny(**{"memory.xl.length": 16, "memory.adaptive_span.enabled": True,
                          "memory.adaptive_span.ramp": 3, "memory.adaptive_span.gradient": gradient,
                          "attention.backend": "eager", **extra}).train()
    with torch.no_grad():  # fractional and whole spans (a whole one puts a key at d = z, the clamp's edge)
        for i, block in enumerate(model.blocks):
            block.attention.span.span.copy_(torch.tensor([1.5, 4.0, 7.25, 12.0]) + i)
    return model


@pytest.mark.parametrize("extra", [{}, {"memory.persistent.vectors": 4}, {"position.kind": "t5"},
                                   {"attention.kv_heads": 2, "memory.feedback.mode": "memory"}],
                         ids=["xl", "persistent (the lse merge)", "t5 bias", "grouped heads, feedback"])
def test_band_gradient_equals_the_dense_one(extra):
    """Training with gradient="band" gives the loss and every parameter's gradient of the dense
    path (the spans' included) over segments with the memory rolling and a row reset; the
    spans' gradients are not zero."""
    torch.manual_seed(0)
    dense = span_model("dense", **extra)
    band = span_model("band", **extra)
    band.load_state_dict(dense.state_dict())
    ids = torch.randint(0, 256, (2, 32))
    losses = {}
    for name, model in (("dense", dense), ("band", band)):
        state, total = model.init_state(2), 0.0
        for start in range(0, 32, 8):
            if start == 16:
                state = state.reset(torch.tensor([True, False]))
            out = model(ids[:, start:start + 8], targets=ids[:, start + 1:start + 9] if start + 9 <= 32
                        else ids[:, start:start + 8], state=state)
            total = total + out.loss
            state = out.state.detach()
        total.backward()
        losses[name] = total.item()
    assert losses["band"] == pytest.approx(losses["dense"], rel=1e-6)
    grads = dict(band.named_parameters())
    for name, p in dense.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert all(block.attention.span.span.grad.abs().sum() > 0 for block in band.blocks)


def test_the_span_gradient_setting_is_checked():
    from memlm.config import ConfigError

    with pytest.raises(ConfigError, match="memory.adaptive_span.gradient.*allowed: dense, band"):
        build_tiny(**{"memory.adaptive_span.enabled": True, "memory.adaptive_span.gradient": "sparse"})


def test_the_window_clamps_each_span_to_its_range_first():
    """window = the longest span clamped to [0, span_max], plus the ramp, also for raw spans
    outside that range (before `clamp_` runs)."""
    module = AdaptiveSpan(heads=2, span_max=20, ramp=4, init=0.0, gradient="dense")
    with torch.no_grad():
        module.span.copy_(torch.tensor([-3.0, 50.0]))
    assert module.window().item() == 24.0
    with torch.no_grad():
        module.span.copy_(torch.tensor([-3.0, -5.0]))
    assert module.window().item() == 4.0
