import pytest
import torch

import memlm
from memlm.decode.generate import filter_logits, sample_next
from tests.conftest import tiny_overrides


def test_generate_returns_prompt_plus_new_tokens_and_greedy_matches_argmax_of_full_pass():
    model = memlm.build("seed-tiny", **tiny_overrides())
    prompt = torch.randint(0, 256, (2, 5))
    ids = memlm.generate(model, prompt, max_new_tokens=7, temperature=0)
    assert ids.shape == (2, 12) and torch.equal(ids[:, :5], prompt)
    # greedy: every new token is the argmax of an uncached forward over what came before
    model.eval()
    for t in range(5, 12):
        assert torch.equal(ids[:, t], model(ids[:, :t]).logits[:, -1].argmax(-1))
    one = memlm.generate(model, prompt[0], max_new_tokens=3, temperature=0)
    assert one.shape == (8,) and torch.equal(one, ids[0, :8])


def test_generate_continues_a_state():
    model = memlm.build("seed-tiny", **tiny_overrides()).eval()
    ids = torch.randint(0, 256, (1, 9))
    first, state = memlm.generate(model, ids[:, :4], max_new_tokens=0, temperature=0, return_state=True)
    assert state.position == 4
    cont = memlm.generate(model, ids[:, 4:], max_new_tokens=2, temperature=0, state=state)
    full = memlm.generate(model, ids, max_new_tokens=2, temperature=0)
    assert torch.equal(cont[:, -2:], full[:, -2:])


def test_sampling_is_reproducible_with_a_generator():
    model = memlm.build("seed-tiny", **tiny_overrides())
    prompt = torch.randint(0, 256, (1, 3))
    a = memlm.generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    b = memlm.generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.6))  # 0.5 < 0.6 needs the second token
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_p=0.5))
    assert kept.tolist() == [[True, False, False, False, False]]
    shuffled = logits[:, [3, 0, 4, 1, 2]]
    kept = torch.isfinite(filter_logits(shuffled, top_p=0.8))  # 0.5 + 0.2 + 0.15 >= 0.8
    assert kept.tolist() == [[False, True, False, True, True]]
    draws = torch.stack([sample_next(logits, 1.0, 2, None) for _ in range(200)])
    assert set(draws.flatten().tolist()) <= {0, 1}


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(top_p=1.5), dict(max_new_tokens=-1)])
def test_bad_sampling_arguments(bad):
    model = memlm.build("seed-tiny", **tiny_overrides())
    args = dict(max_new_tokens=2, temperature=1.0)
    args.update(bad)
    with pytest.raises(ValueError):
        memlm.generate(model, torch.randint(0, 256, (1, 3)), **args)
