"""memlm as an lm-evaluation-harness model: rolling log-likelihoods of a memory model equal one
pass over the whole document (its state carried), a model without memory scores the last tokens
with a full window, continuations and greedy flags, generation stopped at `until`, a local
perplexity task through `simple_evaluate`, and `memlm lm-eval` on a trained run."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import memlm
from tests.cli.test_cli import TINY, corpus, last_json, run  # noqa: F401  (corpus: the fixture)

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from memlm.data import ByteTokenizer  # noqa: E402
from memlm.lm_eval_harness import MemlmLM, bits_per_byte  # noqa: E402
from memlm.train.sample import sample_text  # noqa: E402

SEQ = 8
TEXTS = ["the quick brown fox jumps over the lazy dog, twice: the quick brown fox",
         "short one", "memory lets a model read what came before its window " * 2]


def xl_model():
    """A tiny Transformer-XL whose memory keeps every earlier token of the texts above."""
    torch.manual_seed(0)
    return memlm.build("seed-tiny", layers=2, width=32, seq_len=SEQ, **{"attention.heads": 2, "memory.xl.length": 128})


def plain_model():
    torch.manual_seed(0)
    return memlm.build("seed-tiny", layers=2, width=32, seq_len=SEQ, **{"attention.heads": 2})


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def one_pass_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1 from one forward over the whole sequence (fresh state)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model.eval()(x[:, :-1], state=model.init_state(1)).logits.double()  # (1, n - 1, V)
    return logits.log_softmax(-1).gather(-1, x[:, 1:, None])[0, :, 0]


def test_rolling_loglikelihood_of_a_memory_model_is_one_pass_over_the_document():
    model = xl_model()
    lm = MemlmLM(model, batch_size=2)
    assert lm.stateful and lm.seq_len == SEQ
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    eod = ByteTokenizer().eod
    for text, value in zip(TEXTS, got):
        ids = [eod] + list(text.encode())
        assert len(ids) > 2 * SEQ or text == "short one"
        assert value == pytest.approx(float(one_pass_logprobs(model, ids).sum()), abs=1e-4)
    # the state is what reaches back: without it the same model scores the long texts otherwise
    windowed = MemlmLM(model, stateful=False).loglikelihood_rolling(requests("loglikelihood_rolling", [(TEXTS[0],)]))
    assert abs(windowed[0] - got[0]) > 1e-2


def test_a_model_without_memory_scores_every_token_once_the_last_ones_with_a_full_window():
    model = plain_model()
    lm = MemlmLM(model, batch_size=3)
    assert not lm.stateful
    eod = ByteTokenizer().eod
    short = [eod] + list(b"abcdef")  # fits one window: one pass
    long = [eod] + list(TEXTS[0].encode())  # 73 tokens: blocks of 8 targets from the end
    (short_lp, _), (long_lp, _) = lm.score_rows([(short, 1), (long, 1)])
    assert torch.allclose(short_lp, one_pass_logprobs(model, short), atol=1e-5)
    assert long_lp.shape == (len(long) - 1,)
    last_window = long[-SEQ - 1:]  # the last 8 targets after the 8 tokens before the last one
    assert torch.allclose(long_lp[-SEQ:], one_pass_logprobs(model, last_window), atol=1e-5)
    previous = long[-2 * SEQ - 1:-SEQ]
    assert torch.allclose(long_lp[-2 * SEQ:-SEQ], one_pass_logprobs(model, previous), atol=1e-5)
    first_block = (len(long) - 1) % SEQ  # the block at the start is the short one
    assert torch.allclose(long_lp[:first_block], one_pass_logprobs(model, long[:first_block + 1]), atol=1e-5)
    # batching and order do not change a number
    alone = [MemlmLM(model, batch_size=1).score_rows([row])[0][0] for row in [(short, 1), (long, 1)]]
    assert torch.equal(alone[0], short_lp) or torch.allclose(alone[0], short_lp, atol=1e-6)
    assert torch.allclose(alone[1], long_lp, atol=1e-6)


def test_loglikelihood_is_the_continuation_after_the_context_and_greedy_says_if_it_is_the_argmax():
    model = xl_model()
    lm = MemlmLM(model, batch_size=2)
    eod = ByteTokenizer().eod
    context, continuation = TEXTS[2][:29], " before its"  # the context's 29 bytes span four segments
    ids, more = [eod] + list(context.encode()), list(continuation.encode())
    reference = one_pass_logprobs(model, ids + more)[len(ids) - 1:]
    (got,) = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    assert got[0] == pytest.approx(float(reference.sum()), abs=1e-4)
    # greedy: the model's own greedy continuation is, one byte changed it is not
    _, greedy_ids = sample_text(model, context, 6, temperature=0.0)
    changed = greedy_ids[:3] + [(greedy_ids[3] + 1) % 256] + greedy_ids[4:]
    (_, is_greedy), (_, not_greedy) = lm.score_rows([(ids + greedy_ids, len(ids)), (ids + changed, len(ids))])
    assert bool(is_greedy.all()) and not bool(not_greedy.all()) and not bool(not_greedy[3])
    # an empty context is the end-of-document token alone
    (empty,) = lm.loglikelihood(requests("loglikelihood", [("", "abc")]))
    assert empty[0] == pytest.approx(float(one_pass_logprobs(model, [eod] + list(b"abc")).sum()), abs=1e-4)


def test_generate_until_is_greedy_and_stops_before_the_first_until_string():
    model = xl_model()
    context = "the quick "
    full, _ = sample_text(model, context, 24, temperature=0.0, stop_at_eod=True)
    assert len(full) >= 6
    stop = full[4:6]
    (answer,) = MemlmLM(model, max_gen_toks=24).generate_until(
        requests("generate_until", [(context, {"until": [stop], "do_sample": False})]))
    assert answer == full[:full.index(stop)]
    (capped,) = MemlmLM(model).generate_until(requests("generate_until", [(context, {"until": [], "max_gen_toks": 3})]))
    assert capped == sample_text(model, context, 3, temperature=0.0, stop_at_eod=True)[0]


def write_task(directory, documents: list[str]):
    """A perplexity task over local JSON lines (the harness's wikitext, on files of the test)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    (directory / "memlm_local_ppl.yaml").write_text(
        "task: memlm_local_ppl\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood_rolling\n"
        "test_split: test\n"
        "doc_to_text: ''\n"
        "doc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n")
    return directory


def test_a_local_perplexity_task_scores_bits_per_byte_with_the_memory_carried(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_task(tmp_path / "tasks", TEXTS)
    model = xl_model()
    lm = MemlmLM(model, batch_size=2)
    results = lm_eval.simple_evaluate(model=lm, tasks=["memlm_local_ppl"],
                                      task_manager=TaskManager(include_path=str(tasks), include_defaults=False))["results"]["memlm_local_ppl"]
    eod = ByteTokenizer().eod
    totals = [float(one_pass_logprobs(model, [eod] + list(t.encode())).sum()) for t in TEXTS]
    expected = bits_per_byte(sum(totals), "".join(TEXTS))
    assert results["bits_per_byte,none"] == pytest.approx(expected, rel=1e-5)
    assert results["byte_perplexity,none"] == pytest.approx(2 ** expected, rel=1e-5)
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)  # the harness's word count (a trailing space: one more)
    assert results["word_perplexity,none"] == pytest.approx(math.exp(-sum(totals) / words), rel=1e-5)


def test_memlm_lm_eval_command_on_a_trained_run(corpus, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    code, _, _ = run(capsys, "train", *TINY, "--model.memory.xl.length", "32", "--data", corpus,
                     "--fractions", "0.8", "0.1", "0.1", "--out", out, "--steps", "3", "--eval_every", "3")
    assert code == 0
    tasks = write_task(tmp_path / "tasks", TEXTS)
    code, stdout, _ = run(capsys, "lm-eval", out, "--tasks", "memlm_local_ppl", "--include-path", tasks,
                          "--no-builtin-tasks", "--device", "cpu", "--batch-size", "2", "--json")
    assert code == 0 and "bits_per_byte" in stdout
    result = last_json(stdout)
    assert result["stateful"] is True
    model = MemlmLM(out, device="cpu")
    direct = model.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]))
    assert result["results"]["memlm_local_ppl"]["bits_per_byte,none"] == pytest.approx(
        bits_per_byte(sum(direct), "".join(TEXTS)), rel=1e-5)
    code, _, stderr = run(capsys, "lm-eval", out, "--tasks", "no_such_task_anywhere", "--no-builtin-tasks", "--device", "cpu")
    assert code == 2 and "unknown task" in stderr
