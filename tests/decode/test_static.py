"""The static-cache decode step (memlm.decode.static) against the model's own forward.

The CUDA-graph and compiled variants run the same step; they are checked on a GPU
(tests/gpu/test_static_decode_gpu.py)."""

import pytest
import torch

import memlm
from memlm.decode.static import StaticDecoder, unsupported_reason
from tests.conftest import POSITION_KINDS, tiny_overrides

VARIANTS = {
    **{kind: {"position.kind": kind} for kind in POSITION_KINDS},
    "tupe+t5": {"position.kind": "tupe", "position.tupe_t5": True},
    "t5 per layer": {"position.kind": "t5", "position.t5_shared": False},
    "xpos gqa persistent": {"position.kind": "xpos", "attention.kv_heads": 2, "memory.persistent.vectors": 5},
    "rope mha no qk-norm": {"position.kind": "rope", "attention.kv_heads": 4, "attention.qk_norm": False},
    "post-norm rmsnorm": {"position.kind": "rope", "norm.placement": "post", "norm.kind": "rmsnorm"},
    "persistent no ffn": {"position.kind": "t5", "memory.persistent.vectors": 4, "feedforward.kind": "none"},
    "vanilla": {},
}


def build(name):
    preset = "vanilla-tiny" if name == "vanilla" else "seed-tiny"
    return memlm.build(preset, **tiny_overrides(**VARIANTS[name])).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_static_steps_equal_full_forward(name):
    torch.manual_seed(0)
    model = build(name)
    ids = torch.randint(0, 256, (2, 20))
    full = model(ids).logits  # (2, 20, V)
    decoder = StaticDecoder(model, batch_size=2, max_len=24)
    logits = [decoder.prefill(ids[:, :6])]
    for t in range(6, 20):
        logits.append(decoder.step(ids[:, t:t + 1]).clone())
    assert decoder.length == 20
    torch.testing.assert_close(torch.stack(logits, dim=1), full[:, 5:], atol=1e-4, rtol=0)


def test_prefill_restarts_the_decoder():
    torch.manual_seed(0)
    model = build("rope")
    decoder = StaticDecoder(model, batch_size=1, max_len=16)
    a, b = torch.randint(0, 256, (2, 1, 10))
    decoder.prefill(a[:, :4])
    for t in range(4, 10):
        decoder.step(a[:, t:t + 1])
    first = decoder.prefill(b[:, :3]).clone()
    steps = [decoder.step(b[:, t:t + 1]).clone() for t in range(3, 10)]
    full = model(b).logits[0]
    torch.testing.assert_close(torch.cat([first] + steps), full[2:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["rope", "t5", "learned"])
def test_greedy_generation_matches_the_eager_path(name):
    torch.manual_seed(0)
    model = build(name)
    prompt = torch.randint(0, 256, (3, 5))
    eager = memlm.generate(model, prompt, max_new_tokens=12, temperature=0, decode="eager")
    static = memlm.generate(model, prompt, max_new_tokens=12, temperature=0, decode="static")
    assert static.shape == (3, 17)
    assert torch.equal(static, eager)


def test_sampled_generation_matches_the_eager_path_with_one_seed():
    model = build("rope")
    prompt = torch.randint(0, 256, (2, 4))
    runs = [memlm.generate(model, prompt, 10, temperature=0.9, top_k=20, decode=decode,
                           generator=torch.Generator().manual_seed(3)) for decode in ("eager", "static")]
    assert torch.equal(*runs)


def test_bf16_copy_tracks_the_float32_model():
    torch.manual_seed(0)
    model = build("rope")
    ids = torch.randint(0, 256, (1, 12))
    decoder = StaticDecoder(model, batch_size=1, max_len=12, dtype=torch.bfloat16)
    assert decoder.k_cache[0].dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32
    decoder.prefill(ids[:, :4])
    last = [decoder.step(ids[:, t:t + 1]).float() for t in range(4, 12)][-1]
    reference = model(ids).logits[0, -1]
    assert (last[0] - reference).abs().max() < 0.05 * reference.abs().max()


def test_limits_and_unsupported_models():
    model = build("learned")
    with pytest.raises(ValueError, match="learned positions cover"):
        StaticDecoder(model, batch_size=1, max_len=model.config.seq_len + 1)
    decoder = StaticDecoder(model, batch_size=1, max_len=4)
    with pytest.raises(RuntimeError, match="prefill"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="full"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))
    xl = memlm.build("seed-xl-tiny", **tiny_overrides())
    assert "recurrent" in unsupported_reason(xl)
    with pytest.raises(ValueError, match="does not support"):
        StaticDecoder(xl, batch_size=1, max_len=8)
    # auto decodes it eagerly on a CPU; the static path serves it with memlm.decode.static_memory,
    # and refuses a model that neither decoder serves (memory tokens)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    assert memlm.generate(xl, prompt, 4, temperature=0).shape == (1, 7)
    tokens = memlm.build("seed-xl-tiny", **tiny_overrides(**{"memory.tokens.count": 4}))
    with pytest.raises(ValueError, match="does not support"):
        memlm.generate(tokens, prompt, 4, decode="static")
    with pytest.raises(ValueError, match="takes no state"):
        memlm.generate(model, prompt, 1, decode="static", state=model.init_state(1))


def test_auto_takes_the_static_path_on_cuda_for_models_one_graph_serves():
    """decode="auto": static on CUDA for plain models and for memory models (XL, compressive, kNN);
    eager for slot memories (their graph is captured per segment, not yet measured on a GPU),
    memory tokens (no static path), for a plain model with a state passed in or asked back, and
    on the CPU."""
    from types import SimpleNamespace

    from memlm.decode.generate import _decode_path
    on_cuda, on_cpu = SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)
    plain = memlm.build("seed-tiny", **tiny_overrides())
    xl = memlm.build("seed-xl-tiny", **tiny_overrides())
    compressive = memlm.build("seed-compressive-tiny", **tiny_overrides())
    knn = memlm.build("seed-knn-tiny", **tiny_overrides(**{"memory.knn.layers": [1]}))
    tokens = memlm.build("seed-xl-tiny", **tiny_overrides(**{"memory.tokens.count": 4}))
    slots = memlm.build("seed-xl-tiny", **tiny_overrides(**{"memory.ntm.layers": [1]}))
    assert [_decode_path(m, "auto", on_cuda, None, False) for m in (plain, xl, compressive, knn, tokens, slots)] == \
        ["static", "static", "static", "static", "eager", "eager"]
    assert _decode_path(xl, "auto", on_cpu, None, False) == "eager"
    # a state in or out (a session): the memory decoder loads and returns States, the plain cache does not
    assert _decode_path(xl, "auto", on_cuda, xl.init_state(1), False) == "static"
    assert _decode_path(xl, "auto", on_cuda, None, True) == "static"
    assert _decode_path(plain, "auto", on_cuda, plain.init_state(1), False) == "eager"
    assert _decode_path(plain, "auto", on_cuda, None, True) == "eager"
    assert _decode_path(knn, "auto", on_cuda, knn.init_state(1), True) == "static"
    assert _decode_path(slots, "auto", on_cuda, slots.init_state(1), True) == "eager"
    assert _decode_path(xl, "static", on_cpu, xl.init_state(1), True) == "static"
