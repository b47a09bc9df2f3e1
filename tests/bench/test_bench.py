"""memlm bench (memlm_bench) on a tiny CPU shape: the numbers it reports are the ones it measured, the
reference GPT is what its formula says, and the table and JSON carry every row. No timing
assertions: CPU speeds are noise."""

import json
import math
import statistics

import pytest
import torch
from torch import nn

import memlm
from memlm_bench import BenchConfig, ReferenceGPT, main, reference, run_bench, runner
from memlm_bench import bench_markdown as markdown, write_bench_results as write_results
from memlm_bench.config import resolve
from memlm.train.warmup import memory_warmup
from memlm_bench.workloads import (Entry, Shape, StreamObjective, Workload, dense_flops_per_token, fill_stores,
                                   memlm_loss)
from memlm_bench.measure import measure_training, random_tokens, step_profile
from memlm_bench.peers import Peer

TINY = dict(device="cpu", presets=["vanilla-tiny", "seed-tiny"], batch_size=2, seq_len=32, layers=2, width=32,
            steps=3, warmup=1, repeats=2, gen_batch_sizes=[1, 3], gen_prompt_len=4, gen_new_tokens=5, peers=False)
B, T, L, W, V, STEPS = 2, 32, 2, 32, 257, 3


@pytest.fixture(scope="module")
def result():
    return run_bench(BenchConfig(**TINY))


def rows_by_model(result):
    return {row["model"]: row for row in result["rows"]}


def test_rows_are_the_reference_then_each_preset_at_one_shape(result):
    assert [row["model"] for row in result["rows"]] == ["reference GPT", "memlm vanilla-tiny", "memlm seed-tiny"]
    assert [row["kind"] for row in result["rows"]] == ["reference", "memlm", "memlm"]
    for row in result["rows"]:
        assert row["errors"] == []
        assert row["dims"] == dict(batch_size=B, seq_len=T, layers=L, width=W, heads=4, vocab_size=V)
        assert row["compiled"] is False  # compile applies on CUDA only
        assert row["wall_s"] >= sum(row["train"]["seconds"])


def test_tokens_counted_are_batch_times_seq_times_steps_and_the_rate_uses_the_median(result):
    for row in result["rows"]:
        train = row["train"]
        assert train["tokens"] == B * T * STEPS
        assert len(train["seconds"]) == 2
        assert train["tokens_per_s"] == pytest.approx(train["tokens"] / statistics.median(train["seconds"]), rel=1e-12)
        assert train["peak_mem_bytes"] is None  # CPU


def test_mfu_is_tokens_per_second_times_flops_per_token_over_the_measured_peak(result):
    peak = result["peak"]
    assert (peak["n"], peak["dtype"]) == (256, "float32") and peak["flops"] > 0
    for row in result["rows"]:
        assert row["mfu"] == pytest.approx(row["train"]["tokens_per_s"] * row["flops_per_token"] / peak["flops"],
                                           rel=1e-12)
    for preset in ("vanilla-tiny", "seed-tiny"):
        model = memlm.build(preset, layers=L, width=W, seq_len=T)
        row = rows_by_model(result)[f"memlm {preset}"]
        assert row["flops_per_token"] == model.flops_per_token() == model.flops_per_token(T)  # no memory
        assert row["params"] == model.num_parameters()


def test_ratio_is_train_rate_over_the_reference_rate(result):
    rows = result["rows"]
    assert rows[0]["ratio"] == 1.0
    for row in rows[1:]:
        assert row["ratio"] == pytest.approx(row["train"]["tokens_per_s"] / rows[0]["train"]["tokens_per_s"],
                                             rel=1e-12)


def test_generation_is_measured_at_each_batch_size(result):
    for row in result["rows"]:
        rates = row["gen_tokens_per_s"]
        assert sorted(rates) == ["b1", "b3"]
        assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())


def test_reference_initial_loss_on_random_tokens_is_near_ln_vocab(result):
    assert abs(rows_by_model(result)["reference GPT"]["train"]["initial_loss"] - math.log(V)) < 0.3
    torch.manual_seed(0)
    model = ReferenceGPT(V, 64, 2, 4, 48)
    ids = random_tokens(V, (4, 49), torch.device("cpu"), seed=1)  # (B, T + 1)
    assert ids.unique().numel() > 100  # random ids, not a constant
    _, loss = model(ids[:, :-1], ids[:, 1:])
    assert abs(loss.item() - math.log(V)) < 0.3


@pytest.mark.parametrize("vocab,width,layers,heads,seq", [(257, 32, 2, 4, 32), (100, 48, 3, 6, 20)])
def test_reference_parameters_and_flops_follow_their_formulas(vocab, width, layers, heads, seq):
    model = ReferenceGPT(vocab, width, layers, heads, seq)
    # tied embedding + positions + per block (qkv 3W^2, proj W^2, MLP 8W^2, two bias-free norms) + final norm
    expected = vocab * width + seq * width + layers * (12 * width ** 2 + 2 * width) + width
    assert sum(p.numel() for p in model.parameters()) == expected
    shape = Shape(2, seq, layers, width, heads, vocab)
    assert dense_flops_per_token(model, shape, seq) == 6 * (12 * layers * width ** 2 + vocab * width) \
        + 12 * layers * width * seq
    vanilla = memlm.build("vanilla-tiny", vocab_size=vocab, width=width, layers=layers, seq_len=seq,
                          **{"attention.heads": heads})
    assert vanilla.flops_per_token(seq) == dense_flops_per_token(model, shape, seq)  # same matmuls


def test_reference_cached_greedy_decoding_equals_the_argmax_of_full_passes():
    model = ReferenceGPT(V, 32, 2, 4, 32).eval()
    prompt = torch.randint(0, V, (3, 5))
    ids = reference.generate(model, prompt, 6)
    assert ids.shape == (3, 11) and torch.equal(ids[:, :5], prompt)
    for t in range(5, 11):
        assert torch.equal(ids[:, t], model(ids[:, :t])[0][:, -1].argmax(-1))


def table_lines(text):
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_markdown_has_one_row_per_model_and_names_device_and_torch(result):
    text = markdown(result)
    header, *rows = table_lines(text)
    assert len(rows) == len(result["rows"]) == 3
    for line, row in zip(rows, result["rows"], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == row["model"]
        assert cells[3] == f"{row['train']['tokens_per_s']:,.0f}"
        assert cells[-2] == f"{row['ratio']:.2f}x"
    assert header.split("|")[7:9] == [" gen tok/s b1 ", " gen tok/s b3 "]
    assert result["meta"]["device"] in text and torch.__version__ in text
    assert f"torch.compile mode {result['config']['compile_mode']} where compiled" in text


def test_json_and_markdown_files_round_trip(result, tmp_path):
    json_path, md_path = write_results(result, tmp_path / "out")
    assert json.loads(json_path.read_text()) == result
    assert md_path.read_text() == markdown(result)
    assert json_path.stem == md_path.stem and json_path.parent == tmp_path / "out"


def cli_args(tmp_path):
    args = ["--device", "cpu", "--presets", "seed-tiny", "--batch-size", "2", "--seq-len", "32", "--layers", "2",
            "--width", "32", "--steps", "2", "--repeats", "1", "--gen-batch-sizes", "2",
            "--gen-prompt-len", "4", "--gen-new-tokens", "3", "--no-peers", "--out", str(tmp_path)]
    return args


def test_main_prints_the_result_as_the_last_line_and_writes_it(tmp_path, capsys):
    assert main(cli_args(tmp_path) + ["--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (written,) = tmp_path.glob("*.json")
    assert printed == json.loads(written.read_text())
    assert [row["model"] for row in printed["rows"]] == ["reference GPT", "memlm seed-tiny"]
    assert printed["rows"][1]["train"]["tokens"] == 2 * 32 * 2
    assert printed["config"]["peers"] is False and printed["notes"] == ["peers off (--no-peers)"]


def test_generation_past_seq_len_is_measured_for_memory_rows_only(tmp_path, capsys):
    args = cli_args(tmp_path) + ["--gen-new-tokens", "40", "--json"]
    args[args.index("seed-tiny")] = "seed-xl-tiny"
    assert main(args) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]}
    assert rows["memlm seed-xl-tiny"]["gen_tokens_per_s"]["b2"] > 0  # its memory rolls past position 32
    assert rows["reference GPT"]["gen_tokens_per_s"] == {}
    assert any("exceed seq_len 32" in note for note in rows["reference GPT"]["notes"])


def test_a_compile_mode_outside_torchs_is_rejected():
    with pytest.raises(ValueError, match="compile_mode must be one of default, reduce-overhead"):
        resolve(BenchConfig(compile_mode="fast"), torch.device("cpu"))


def test_device_defaults():
    cpu = resolve(BenchConfig(), torch.device("cpu"))
    assert (cpu.presets, cpu.batch_size, cpu.seq_len, cpu.layers, cpu.width, cpu.steps) == \
        (["vanilla-tiny", "seed-tiny"], 2, 64, 2, 64, 2)
    cuda = resolve(BenchConfig(), torch.device("cuda"))
    assert (cuda.presets, cuda.batch_size, cuda.seq_len, cuda.layers, cuda.width, cuda.steps) == \
        (["vanilla-small", "seed-small"], 32, 512, None, None, 20)
    assert resolve(BenchConfig(batch_size=5), torch.device("cpu")).batch_size == 5


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, inputs, targets):
        raise RuntimeError("kernel exploded")


def exploding_workload(shape, device, decode_mode):
    return Workload(Exploding(), flops_per_token=1.0, params=0)


def unbuildable(shape, device, decode_mode):
    raise ImportError("peer needs a missing extension")


def test_failing_and_missing_peers_become_rows_and_notes_not_crashes(monkeypatch):
    monkeypatch.setattr(runner, "PEERS", [
        Peer(Entry("unbuildable peer", "peer", unbuildable), "torch"),
        Peer(Entry("exploding peer", "peer", exploding_workload), "torch"),
        Peer(Entry("absent peer", "peer", unbuildable), "no_such_peer_package"),
    ])
    result = run_bench(BenchConfig(**{**TINY, "presets": ["seed-tiny"], "peers": True, "generate": False}))
    rows = rows_by_model(result)
    assert list(rows) == ["reference GPT", "memlm seed-tiny", "unbuildable peer", "exploding peer"]
    assert rows["unbuildable peer"]["errors"] == ["build failed: ImportError: peer needs a missing extension"]
    assert rows["exploding peer"]["errors"] == ["train failed: RuntimeError: kernel exploded"]
    for name in ("unbuildable peer", "exploding peer"):
        assert (rows[name]["train"], rows[name]["mfu"], rows[name]["ratio"]) == (None, None, None)
    assert rows["memlm seed-tiny"]["errors"] == [] and rows["memlm seed-tiny"]["ratio"] > 0
    assert result["notes"] == ["no_such_peer_package not installed: its peers skipped "
                               "(pip install no-such-peer-package)"]
    _, *lines = table_lines(markdown(result))
    assert len(lines) == 4 and "train failed: RuntimeError: kernel exploded" in lines[3]


def test_peer_names_pick_peers_and_unknown_names_are_rejected(monkeypatch):
    monkeypatch.setattr(runner, "PEERS", [
        Peer(Entry("first peer", "peer", unbuildable), "torch"),
        Peer(Entry("second peer", "peer", unbuildable), "torch"),
    ])
    config = resolve(BenchConfig(**{**TINY, "peers": True, "peer_names": ["second peer"]}), torch.device("cpu"))
    ((shape, entries),) = runner.plan(config)
    assert shape == Shape(B, T, L, W, 4, V)
    assert [entry.name for entry in entries] == ["reference GPT", "memlm vanilla-tiny", "memlm seed-tiny", "second peer"]
    with pytest.raises(ValueError, match="unknown peer third peer; known: first peer, second peer"):
        runner.plan(resolve(BenchConfig(**{**TINY, "peers": True, "peer_names": ["third peer"]}),
                            torch.device("cpu")))


# ----- memory presets: trained on streams, as `memlm train` trains them ---------------------

CPU = torch.device("cpu")


def memory_entry(entry, **changes):
    """The planned memlm entry of a preset entry at the TINY shape, and that shape."""
    config = resolve(BenchConfig(**{**TINY, "presets": [entry], **changes}), CPU)
    ((shape, entries),) = runner.plan(config)
    return entries[1], shape


def segments(n, seed=0):
    data = random_tokens(V, (n, B, T + 1), CPU, seed)
    return [(d[:, :-1], d[:, 1:]) for d in data]


def test_a_stateful_row_carries_the_state_between_steps_as_the_trainer_does():
    entry, shape = memory_entry("seed-xl-tiny")
    torch.manual_seed(0)
    workload = entry.build(shape, CPU, "eager")
    objective = workload.objective
    assert isinstance(objective, StreamObjective) and objective.state.position == 0
    assert workload.notes == ["streams with memory: state carried across steps"]
    torch.manual_seed(0)
    model = memlm.LanguageModel(objective.model.config)  # the same weights, driven by hand
    state = model.init_state(B)
    for step, (x, y) in enumerate(segments(3)):
        out = model(x, targets=y, state=state)
        state = out.state.detach()
        loss = objective(x, y)
        assert torch.equal(loss, out.loss + out.aux_loss)
        assert objective.steps == step + 1 and objective.state.position == (step + 1) * T
        for mine, theirs in zip(objective.state.layers, state.layers, strict=True):
            assert mine.mem.shape == (B, T, W)  # memory = seq_len, scaled with --seq-len
            assert torch.equal(mine.mem, theirs.mem) and not mine.mem.requires_grad
        if step:  # the memory is read: without it the same segment scores differently
            assert not torch.allclose(loss, memlm_loss(model, x, y))


def test_a_stateful_row_advances_its_state_by_one_segment_per_training_step():
    entry, shape = memory_entry("seed-compressive-tiny")
    workload = entry.build(shape, CPU, "eager")
    train = measure_training(workload, shape, steps=3, warmup=2, repeats=2, compile=False, device=CPU, seed=0)
    steps = 2 + 2 * 3  # warm-up (its first step included) + repeats x steps
    objective = workload.objective
    assert objective.steps == steps and objective.state.position == steps * T
    assert train["tokens"] == B * T * 3
    for layer in objective.state.layers:  # memory T, compressed T / 4 at rate 4
        assert (layer.mem.shape, layer.cmem.shape) == ((B, T, W), (B, T // 4, W))
    assert memory_warmup(objective.model.config) == 5  # 4 shapes (none, mem, + cmem, settled) + 1


def test_a_knn_row_fills_its_stores_to_capacity_before_the_first_step():
    entry, shape = memory_entry("seed-knn-tiny")
    workload = entry.build(shape, CPU, "eager")
    objective = workload.objective
    config = objective.model.config
    capacity = config.memory.knn.capacity
    assert (capacity, config.memory.knn.layers, config.memory.knn.k) == (65536, [1], 32)  # layer 2 of 4 -> 1 of 2
    (store,) = objective.state.stores.values()
    assert store.counts.tolist() == store.written.tolist() == [capacity] * B and store.filled == capacity
    assert objective.state.position == capacity and objective.steps == 0  # nothing trained yet
    keys, _, positions = store.entries(1)
    assert torch.equal(positions, torch.arange(capacity))
    assert store.dtype == torch.bfloat16  # the preset's store precision
    assert torch.allclose(keys.float().norm(dim=-1), torch.ones(()), atol=1e-2)  # unit keys, as the layer writes them
    q = torch.nn.functional.normalize(torch.randn(B, 4, T, config.head_dim), dim=-1)
    assert bool(store.search(q, 32).valid.all())  # every query finds its k from the first step
    assert workload.notes == ["streams with memory: state carried across steps", "kNN stores filled to 65,536/row"]
    for x, y in segments(2):
        objective(x, y)
    assert store.counts.tolist() == [capacity] * B and store.written.tolist() == [capacity + 2 * T] * B
    assert objective.state.position == capacity + 2 * T
    assert fill_stores(memlm.build("seed-tiny").init_state(B)) == 0  # no stores, nothing filled


def test_compiled_stream_training_recompiles_only_while_the_memory_fills(monkeypatch):
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compile(module, backend="aot_eager", **kw))
    entry, shape = memory_entry("seed-knn-tiny")
    workload = entry.build(shape, CPU, "eager")
    warmup = memory_warmup(workload.objective.model.config)
    before = runner.compiled_graphs()
    try:
        measure_training(workload, shape, steps=1, warmup=warmup, repeats=1, compile=True, device=CPU, seed=0)
        assert runner.compiled_graphs() - before == 2  # no memory yet, then the steady state
        assert workload.objective.compiled is not None  # the model compiled, the state kept outside
        measure_training(workload, shape, steps=3, warmup=1, repeats=2, compile=True, device=CPU, seed=1)
        assert runner.compiled_graphs() - before == 2  # the growing position recompiles nothing
    finally:
        torch._dynamo.reset()
    objective = workload.objective
    assert objective.steps == warmup + 1 + 1 + 2 * 3
    (store,) = objective.state.stores.values()
    assert store.written.tolist() == [65536 + objective.steps * T] * B  # written from the compiled graph


MEMORY_ENTRIES = ["seed-tiny", "seed-xl-tiny", "seed-knn-tiny", "seed-tiny memory.persistent.vectors=4"]


@pytest.fixture(scope="module")
def memory_result():
    return run_bench(BenchConfig(**{**TINY, "presets": MEMORY_ENTRIES, "steps": 2, "repeats": 1, "generate": False}))


def test_memory_rows_are_compared_with_their_family_without_memory(memory_result):
    entries, result = MEMORY_ENTRIES, memory_result
    rows = rows_by_model(result)
    assert list(rows) == ["reference GPT"] + [f"memlm {entry}" for entry in entries]
    base = rows["memlm seed-tiny"]["train"]["tokens_per_s"]
    for entry in entries[1:]:
        row = rows[f"memlm {entry}"]
        assert row["errors"] == [] and row["baseline"] == "memlm seed-tiny"
        assert row["baseline_ratio"] == pytest.approx(row["train"]["tokens_per_s"] / base, rel=1e-12)
    for name in ("reference GPT", "memlm seed-tiny"):
        assert (rows[name]["baseline"], rows[name]["baseline_ratio"]) == (None, None)
    assert rows["memlm seed-tiny memory.persistent.vectors=4"]["notes"] == ["no state: this memory needs none"]
    assert rows["memlm seed-knn-tiny"]["notes"][1] == "kNN stores filled to 65,536/row"
    assert all(row["warmup"] == 1 and row["graphs_compiled"] is None for row in rows.values())  # CPU: eager
    header, *lines = table_lines(markdown(result))
    assert header.split("|")[-4:-1] == [" vs no memory ", " FLOP limit vs no memory ", " notes "]
    cells = {line.split("|")[1].strip(): line.split("|")[-4].strip() for line in lines}
    assert cells["memlm seed-xl-tiny"] == f"{rows['memlm seed-xl-tiny']['baseline_ratio']:.2f}x seed-tiny"
    assert cells["memlm seed-tiny"] == cells["reference GPT"] == "—"


def test_memory_rows_carry_their_flop_limit_and_its_ratio_to_the_family_without_memory(memory_result):
    """limit_tokens_per_s = the run's peak / the row's FLOPs per token, memory and the kNN search
    counted; the FLOP limit column = the baseline's FLOPs per token / the row's: both from models
    built here (the search: 2 x heads x head_dim x capacity a token per kNN layer)."""
    peak, rows = memory_result["peak"]["flops"], rows_by_model(memory_result)
    config = BenchConfig(**TINY)
    models = {entry: memlm.LanguageModel(runner.preset_config(entry, config)) for entry in MEMORY_ENTRIES}
    flops = {entry: model.flops_per_token() for entry, model in models.items()}
    knn = models["seed-knn-tiny"].config
    search = {entry: 0.0 for entry in MEMORY_ENTRIES}
    search["seed-knn-tiny"] = 2 * knn.attention.heads * knn.head_dim * knn.memory.knn.capacity * len(knn.memory.knn.layers)
    assert flops["seed-xl-tiny"] > flops["seed-tiny"] and flops["seed-knn-tiny"] > flops["seed-tiny"]
    for entry in MEMORY_ENTRIES:
        row = rows[f"memlm {entry}"]
        total = flops[entry] + search[entry]
        assert row["flops_per_token"] == flops[entry] and row["search_flops_per_token"] == search[entry]
        assert row["limit_tokens_per_s"] == pytest.approx(peak / total, rel=1e-12)
        expected = None if entry == "seed-tiny" else pytest.approx(flops["seed-tiny"] / total, rel=1e-12)
        assert row["baseline_flop_ratio"] == expected
    reference = rows["reference GPT"]
    assert reference["baseline_flop_ratio"] is None
    assert reference["limit_tokens_per_s"] == pytest.approx(peak / reference["flops_per_token"], rel=1e-12)
    _, *lines = table_lines(markdown(memory_result))
    cells = {line.split("|")[1].strip(): line.split("|")[-3].strip() for line in lines}
    assert cells["memlm seed-xl-tiny"] == f"{flops['seed-tiny'] / flops['seed-xl-tiny']:.2f}x"
    assert cells["memlm seed-tiny"] == cells["reference GPT"] == "—"


def test_reshaping_keeps_memory_proportions_and_entries_take_their_own_overrides():
    def planned(entry, **shape):
        return runner.preset_config(entry, BenchConfig(**{**TINY, **shape}))

    top = planned("seed-xl-top-small", layers=4, seq_len=64, width=64)
    assert top.memory_lengths() == [16, 16, 16, 64]  # long memory (= seq_len) in the top layer only
    assert planned("seed-knn-small", layers=4).memory.knn.layers == [2]  # 9 of 12 -> 2 of 4
    compressive = planned("seed-compressive-tiny", seq_len=32)
    assert (compressive.memory.xl.length, compressive.memory.compressive.length) == (32, 8)
    own = planned("seed-knn-tiny", layers=None, seq_len=None, width=None)
    assert own == memlm.config.get_preset("seed-knn-tiny")  # its own shape: untouched
    persistent = planned("seed-small  memory.persistent.vectors=16 feedforward.kind=none")
    assert (persistent.memory.persistent.vectors, persistent.feedforward.kind, persistent.layers) == (16, "none", L)
    with pytest.raises(ValueError, match="must read PRESET"):
        resolve(BenchConfig(**{**TINY, "presets": ["seed-small memory.persistent.vectors"]}), CPU)


@pytest.mark.parametrize("preset", ["seed-tiny", "seed-compressive-tiny"])
def test_graph_decode_mode_generates_what_the_eager_decoder_generates(preset):
    """The static decoders (a key/value cache; memory buffers for the memory model, over four
    segments of 16 here) generate what the eager decoder does."""
    from memlm_bench.workloads import memlm_decoder, memlm_static_decoder
    torch.manual_seed(0)
    model = memlm.build(preset, layers=2, width=32, seq_len=16 if preset != "seed-tiny" else 64,
                        **{"attention.heads": 4}).eval()
    prompt, new = torch.randint(0, 256, (3, 6)), 10 if preset == "seed-tiny" else 60
    with torch.no_grad():
        eager, static = memlm_decoder(model), memlm_static_decoder(model, 64)
        assert static.unbounded == (preset != "seed-tiny")
        expected = eager.extend(eager.prefill(prompt), new)[:, 1:]  # the eager decoder returns the last prompt token too
        for _ in range(2):  # the same static decoder serves a second generation
            assert torch.equal(static.extend(static.prefill(prompt), new), expected)


def test_graph_decode_mode_falls_back_to_eager_for_memory_tokens_and_says_so():
    row = run_bench(BenchConfig(presets=["seed-xl-tiny memory.tokens.count=4", "seed-xl-tiny"], decode="graph",
                                peers=False, device="cpu", repeats=1, gen_batch_sizes=[1]))
    rows = {r["model"]: r for r in row["rows"]}
    assert any("decodes eagerly" in note for note in rows["memlm seed-xl-tiny memory.tokens.count=4"]["notes"])
    assert not any("decodes eagerly" in note for note in rows["memlm seed-xl-tiny"]["notes"])
    assert all(r["gen_tokens_per_s"]["b1"] > 0 for r in rows.values())


def test_a_profile_accounts_for_every_operator_of_its_steps():
    """--profile-steps: the profiled steps run after the timed ones (the state moves on by them),
    the names are ranked by time and cover the whole measured time, and a per-step count is
    exact: one embedding lookup a step."""
    entry, shape = memory_entry("seed-compressive-tiny")
    workload = entry.build(shape, CPU, "eager")
    train = measure_training(workload, shape, steps=1, warmup=5, repeats=1, compile=False, device=CPU, seed=0,
                             profile_steps=2)
    assert workload.objective.steps == 5 + 1 + 2
    profile = step_profile(lambda i: workload.objective(*segments(1, seed=i)[0]).backward(), 2, CPU, top=10_000)
    assert train["profile"]["steps"] == 2 and len(train["profile"]["top"]) <= 25
    for result in (train["profile"], profile):
        assert sum(k["share"] for k in result["top"]) <= 1 + 1e-9
        assert [k["ms_per_step"] for k in result["top"]] == sorted((k["ms_per_step"] for k in result["top"]),
                                                                   reverse=True)
    assert sum(k["ms_per_step"] for k in profile["top"]) == pytest.approx(profile["ms_per_step"])
    assert sum(k["share"] for k in profile["top"]) == pytest.approx(1.0)
    embedding = {k["name"]: k["calls_per_step"] for k in profile["top"]}["aten::embedding"]
    assert embedding == 1  # one forward a step


def test_the_race_like_x_transformers_xl_peer_has_the_races_rotary_and_dropout(monkeypatch):
    """`x-transformers XL race` builds x-transformers as `memlm race --peer-dropout 0.2` trains its
    x-transformers-XL (rotary, dropout 0.2 on embeddings, feed-forward and attention, memory
    seq_len); `x-transformers XL` stays the plain one. A stand-in module records the arguments."""
    import sys
    import types

    from memlm_bench import peers

    built = []

    class Recorder(nn.Module):
        def __init__(self, **kwargs):
            super().__init__()
            built.append(kwargs)
            self.proj = nn.Linear(2, 2)

    fake = types.SimpleNamespace(Decoder=lambda **kwargs: kwargs, TransformerWrapper=Recorder)
    monkeypatch.setitem(sys.modules, "x_transformers", fake)
    shape = Shape(batch_size=2, seq_len=16, layers=2, width=32, heads=2, vocab_size=257)
    by_name = {peer.entry.name: peer.entry for peer in peers.PEERS}
    race = by_name["x-transformers XL race"].build(shape, torch.device("cpu"), "eager")
    plain = by_name["x-transformers XL"].build(shape, torch.device("cpu"), "eager")
    (race_args, plain_args) = built
    assert race_args["max_mem_len"] == plain_args["max_mem_len"] == 16
    assert race_args["emb_dropout"] == 0.2 and plain_args["emb_dropout"] == 0.0
    layers = race_args["attn_layers"]
    assert layers["rotary_pos_emb"] is True and layers["ff_dropout"] == layers["attn_dropout"] == 0.2
    assert "rotary_pos_emb" not in plain_args["attn_layers"] and "ff_dropout" not in plain_args["attn_layers"]
    assert any("dropout 0.2" in note for note in race.notes) and not any("dropout" in n for n in plain.notes)
