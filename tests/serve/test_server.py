"""`memlm serve` on the loopback address: OpenAI-compatible completions, streaming, stop strings,
sessions whose memory continues a stream, concurrent clients and 4xx errors."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import memlm  # noqa: E402
from memlm.data import EOD, ByteTokenizer  # noqa: E402
from memlm.serve.app import create_app  # noqa: E402
from memlm.serve.engine import Engine  # noqa: E402
from memlm.serve.sessions import SessionError, SessionStore  # noqa: E402
from tests.conftest import tiny_overrides  # noqa: E402

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return memlm.build("seed-xl-tiny", **tiny_overrides(seq_len=16)).eval()  # memory rolls every 16 tokens


@pytest.fixture
def serve(model):
    """Start a server with these session caps; yields an httpx client bound to it."""
    servers = []

    def start(max_sessions=8, max_bytes=2 ** 30, max_tokens=256):
        app = create_app(Engine(model, torch.device("cpu")), SessionStore(max_sessions, max_bytes), "tiny",
                         max_tokens)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        servers.append((server, thread))
        return httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)


def reference(model, prompt: str, n: int, seed: int, state=None):
    """memlm.generate's sampled continuation (temperature 1, this seed) and the state after it
    (the prompt after an EOD for a new stream)."""
    ids = torch.tensor(([] if state is not None else [EOD]) + TOKENIZER.encode(prompt).tolist())
    out, state = memlm.generate(model, ids, n, temperature=1.0, state=state, return_state=True, decode="eager",
                                generator=torch.Generator().manual_seed(seed))
    return out[len(ids):].tolist(), state


def complete(client, **body):
    response = client.post("/v1/completions", json={"temperature": 1.0, "seed": 0, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_completion_is_memlms_generation(serve, model):
    client = serve()
    body = complete(client, prompt="def f(x):", max_tokens=40, seed=5)
    ids, _ = reference(model, "def f(x):", 40, seed=5)
    stop = ids.index(EOD) if EOD in ids else len(ids)
    assert body["choices"][0]["text"] == TOKENIZER.decode(ids[:stop])
    assert body["object"] == "text_completion" and body["usage"]["prompt_tokens"] == 9
    assert body["usage"]["completion_tokens"] == min(40, stop + 1)
    assert body["choices"][0]["finish_reason"] == ("stop" if stop < 40 else "length")


def test_streaming_sends_the_same_text_as_events(serve):
    client = serve()
    whole = complete(client, prompt="import os", max_tokens=30)["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"prompt": "import os", "max_tokens": 30, "seed": 0,
                                                         "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and len(chunks) > 2


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_requests_that_start_together_share_forwards_and_generate_what_they_would_alone(model, decode):
    """Four new streams with prompts of one length and a fifth of another length, sent at once:
    each text and final State equal the request served alone (its own seed), while the four
    share their forwards (one for their prompts, one per step: a batched forward, or, static, the
    rows of one decoder) and the fifth interleaves."""
    from memlm.serve.engine import Completion
    prompts = ["abcd", "efgh", "ijkl", "mnop", "a longer prompt"]
    alone = []
    for seed, prompt in enumerate(prompts):
        engine, result = Engine(model, torch.device("cpu"), gather_ms=0, decode=decode), Completion()
        alone.append(("".join(engine.complete(prompt, 24, 1.0, seed=seed, result=result)), result))
        assert engine.forwards == 1 + result.completion_tokens
    engine = Engine(model, torch.device("cpu"), gather_ms=300, decode=decode)  # five threads arrive meanwhile
    results = [Completion() for _ in prompts]
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda i: "".join(engine.complete(prompts[i], 24, 1.0, seed=i, result=results[i])),
                              range(len(prompts))))
    for (text, result), got, mine in zip(alone, texts, results):
        assert got == text and mine.completion_tokens == result.completion_tokens
        assert mine.finish_reason == result.finish_reason and mine.state.position == result.state.position
        for a, b in zip(mine.state.layers, result.state.layers):
            for key, tensor in b.tensors().items():
                torch.testing.assert_close(a.tensors()[key], tensor, atol=1e-5, rtol=0, msg=key)
    shared = max(r.completion_tokens for r in results[:4])
    assert engine.forwards <= (1 + shared) + (1 + results[4].completion_tokens)
    assert engine.forwards < sum(1 + r.completion_tokens for r in results)


def test_a_stop_string_ends_the_text_before_it(serve):
    client = serve()
    whole = complete(client, prompt="class A:", max_tokens=60, seed=1, temperature=1.0)["choices"][0]["text"]
    stop = whole[10:12]
    body = complete(client, prompt="class A:", max_tokens=60, seed=1, temperature=1.0, stop=[stop, "\x00zz"])
    assert body["choices"][0]["text"] == whole[:whole.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


def test_a_session_continues_its_stream_as_one_long_generation(serve, model):
    client = serve()
    session = client.post("/v1/sessions").json()["id"]
    first = complete(client, prompt="x = 1\n", max_tokens=20, session=session, seed=1)
    second = complete(client, prompt="y = ", max_tokens=20, session=session, seed=2)
    assert first["session"] == second["session"] == session
    ids1, state = reference(model, "x = 1\n", 20, seed=1)
    ids2, _ = reference(model, "y = ", 20, seed=2, state=state)  # one stream of 51 tokens: memory rolled thrice
    assert EOD not in ids1 + ids2  # (else the texts stop early: pick other prompts)
    assert first["choices"][0]["text"] == TOKENIZER.decode(ids1)
    assert second["choices"][0]["text"] == TOKENIZER.decode(ids2)
    fresh = complete(client, prompt="y = ", max_tokens=20, seed=2)["choices"][0]["text"]
    assert fresh != second["choices"][0]["text"]  # without the session the memory is empty


def test_concurrent_clients_each_get_their_own_answer(serve):
    client = serve()
    prompts = [f"def f{i}(a, b):" for i in range(8)]
    def ask(i: int) -> str:
        return complete(client, prompt=prompts[i], max_tokens=12, seed=i)["choices"][0]["text"]

    alone = [ask(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone and len(set(alone)) == len(prompts)


@pytest.mark.parametrize("body,status,words", [
    ({"prompt": "", "max_tokens": 4}, 400, "empty"),
    ({"prompt": "a", "max_tokens": 10_000}, 400, "limit"),
    ({"prompt": "a", "max_tokens": 4, "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "max_tokens": 4, "stop": ["", "x"]}, 400, "stop"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": 4, "session": "sess-nope"}, 404, "unknown session"),
])
def test_bad_requests_get_a_4xx_json_error(serve, body, status, words):
    response = serve().post("/v1/completions", json=body)
    assert response.status_code == status
    assert words in response.json()["error"]["message"] and response.json()["error"]["code"] == status


def test_an_evicted_session_says_so(serve):
    client = serve(max_sessions=1)
    old = client.post("/v1/sessions").json()["id"]
    client.post("/v1/sessions")  # the store keeps one session: the older one goes
    response = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "session": old})
    assert response.status_code == 410 and "evicted" in response.json()["error"]["message"]


def test_the_session_store_evicts_least_recently_used_idle_sessions_by_count_and_bytes(model):
    store = SessionStore(max_sessions=2, max_bytes=10 ** 9)
    a, b = store.create(), store.create()
    store.release(store.acquire(a), None, 0)  # a is now the most recently used
    c = store.create()
    with pytest.raises(SessionError, match="evicted") as evicted:
        store.acquire(b)
    assert evicted.value.status == 410 and len(store) == 2
    busy = store.acquire(a)
    with pytest.raises(SessionError, match="another request"):
        store.acquire(a)
    d = store.create()  # a is busy, so c (idle) goes although a was used earlier
    with pytest.raises(SessionError, match="evicted"):
        store.acquire(c)
    state = model(torch.zeros(1, 20, dtype=torch.long), state=model.init_state(1)).state
    per_state = sum(t.numel() * t.element_size() for layer in state.layers for t in layer.tensors().values()) + 8
    small = SessionStore(max_sessions=10, max_bytes=per_state + 1)
    x, y = small.create(), small.create()
    small.release(small.acquire(x), state, 21)
    assert small.bytes == per_state
    small.release(small.acquire(y), state, 21)  # two states exceed the bytes: x, least recently used, goes
    assert len(small) == 1 and small.acquire(y).tokens == 21
    store.release(busy, None, 0)
    assert store.acquire(d).id == d


def test_the_command_refuses_bad_options_before_loading(capsys):
    from memlm import cli
    assert cli.main(["serve", "no-such-run", "--max-sessions", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert cli.main(["serve", "no-such-run", "--max-batch", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
    assert cli.main(["serve", "no-such-run", "--gather-ms", "-1"]) == 2
    assert "--gather-ms must lie in" in capsys.readouterr().err
    assert cli.main(["serve", "no-such-run"]) == 2
    assert "no such run directory" in capsys.readouterr().err


@pytest.mark.parametrize("preset,extra", [("seed-xl-tiny", {}), ("seed-knn-tiny", {"memory.knn.layers": [1],
                                                                        "memory.knn.dtype": "float32"})],
                         ids=["xl", "knn"])
def test_static_decoding_serves_what_the_forward_serves(preset, extra):
    """decode="static" (a pooled MemoryStaticDecoder per request, graph-free on the CPU): a new
    stream, then a session continued from its State, give the texts and final States of the
    eager engine, across memory rolls; finished requests' decoders are reused."""
    from memlm.serve.engine import Completion
    torch.manual_seed(0)
    model = memlm.build(preset, **tiny_overrides(seq_len=16, **extra)).eval()
    runs = {}
    for decode in ("eager", "static"):
        engine = Engine(model, torch.device("cpu"), gather_ms=0, decode=decode)
        assert engine.static == (decode == "static")
        first, second = Completion(), Completion()
        text1 = "".join(engine.complete("def f(x):", 20, 1.0, seed=3, result=first))
        text2 = "".join(engine.complete(" return", 20, 1.0, seed=4, state=first.state, result=second))
        runs[decode] = (text1, text2, second.state, engine)
    (eager1, eager2, eager_state, _), (text1, text2, state, engine) = runs["eager"], runs["static"]
    assert (text1, text2) == (eager1, eager2) and len(text1) > 0
    assert state.position == eager_state.position > 32  # the memory rolled twice
    for a, b in zip(state.layers, eager_state.layers):
        for key, tensor in b.tensors().items():
            torch.testing.assert_close(a.tensors()[key], tensor, atol=1e-5, rtol=0, msg=key)
    for layer, store in eager_state.stores.items():
        torch.testing.assert_close(state.stores[layer].keys, store.keys, atol=1e-5, rtol=0)
    assert len(engine._decoders[1]) == 1  # the second request reused the first one's decoder


def test_static_decoding_refuses_a_model_it_cannot_serve():
    plain = memlm.build("seed-tiny", **tiny_overrides())
    with pytest.raises(ValueError, match="cannot serve this model: it carries no recurrent memory"):
        Engine(plain, torch.device("cpu"), decode="static")
    assert not Engine(plain, torch.device("cpu")).static  # auto: eager off CUDA
    with pytest.raises(ValueError, match="decode must be"):
        Engine(plain, torch.device("cpu"), decode="graph")


def test_static_rows_that_end_early_keep_their_own_state(model):
    """Rows of one static decoder end at 5, 10, 15 and 20 tokens: each text and final State equal
    the request served alone, though the decoder goes on (filler tokens) for the others; the
    decoder returns to the pool once all four have ended."""
    from memlm.serve.engine import Completion
    prompts, lengths = ["abcd", "efgh", "ijkl", "mnop"], [5, 10, 15, 20]

    def serve_alone(i):
        engine, result = Engine(model, torch.device("cpu"), gather_ms=0, decode="static"), Completion()
        return "".join(engine.complete(prompts[i], lengths[i], 1.0, seed=i, result=result)), result

    alone = [serve_alone(i) for i in range(4)]
    engine = Engine(model, torch.device("cpu"), gather_ms=300, decode="static")
    results = [Completion() for _ in prompts]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda i: "".join(engine.complete(prompts[i], lengths[i], 1.0, seed=i,
                                                                result=results[i])), range(4)))
    assert engine.forwards <= 1 + max(lengths)  # one prefill, then one step per token of the longest
    for (text, result), got, mine in zip(alone, texts, results):
        assert got == text and mine.state.position == result.state.position
        for a, b in zip(mine.state.layers, result.state.layers):
            for key, tensor in b.tensors().items():
                torch.testing.assert_close(a.tensors()[key], tensor, atol=1e-5, rtol=0, msg=key)
    assert len(engine._decoders[4]) == 1
