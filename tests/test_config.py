import dataclasses
import json
import subprocess
import sys

import pytest

import memlm
from memlm.config import ConfigError, ModelConfig, apply_overrides, get_preset, resolve


def test_presets_cover_both_families_and_three_sizes():
    names = memlm.presets()
    for family in ("vanilla", "seed"):
        for size in ("tiny", "small", "base"):
            assert f"{family}-{size}" in names


def test_preset_shapes_and_choices():
    small = get_preset("vanilla-small")
    assert (small.layers, small.width, small.attention.heads) == (12, 512, 8)
    base = get_preset("seed-base")
    assert (base.layers, base.width) == (12, 768)
    seed = get_preset("seed-small")
    assert (seed.bias, seed.norm.kind, seed.attention.qk_norm, seed.feedforward.kind,
            seed.kv_heads, seed.position.kind) == (False, "scalenorm", True, "relu2", 1, "rope")
    vanilla = get_preset("vanilla-tiny")
    assert (vanilla.bias, vanilla.norm.kind, vanilla.feedforward.kind, vanilla.kv_heads,
            vanilla.position.kind) == (True, "layernorm", "gelu", vanilla.attention.heads, "learned")


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_config_round_trips_through_files(tmp_path, suffix):
    config = resolve("seed-tiny", **{"attention.kv_heads": 2, "position.kind": "tupe",
                                     "position.tupe_t5": True, "max_positions": 512})
    path = tmp_path / f"config{suffix}"
    config.save(path)
    assert ModelConfig.load(path) == config


def test_dotted_and_dunder_overrides_with_string_values():
    config = resolve("seed-tiny", **{"attention.kv_heads": "2", "norm__kind": "rmsnorm", "bias": "true",
                                     "attention.head_dim": "none", "feedforward": {"mult": "2.5"}})
    assert config.attention.kv_heads == 2 and config.norm.kind == "rmsnorm" and config.bias is True
    assert config.attention.head_dim is None and config.feedforward.mult == 2.5
    built = memlm.build("seed-tiny", layers=1)
    assert built.config.layers == 1 and len(built.blocks) == 1


def test_to_dict_is_json_serialisable_with_string_kinds():
    data = get_preset("seed-small").to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["position"]["kind"] == "rope"


BAD = [
    ({"layers": 0}, "layers"),
    ({"width": -4}, "width"),
    ({"attention.heads": 3}, "attention.heads"),  # 128 % 3 != 0
    ({"attention.kv_heads": 3}, "attention.kv_heads"),
    ({"attention.dropout": 1.5}, "attention.dropout"),
    ({"attention.forgetful": -0.1}, "attention.forgetful"),
    ({"attention.backend": "cuda"}, "attention.backend"),
    ({"attention.backend": "flex", "attention.dropout": 0.1}, "attention.dropout"),
    ({"attention.qk_norm_scale": 0.0}, "attention.qk_norm_scale"),
    ({"position.kind": "alibi"}, "position.kind"),
    ({"position.rope_dim": 7}, "position.rope_dim"),
    ({"position.rope_dim": 64}, "position.rope_dim"),  # head_dim is 32
    ({"position.rope_base": 1.0}, "position.rope_base"),
    ({"position.kind": "xpos", "position.xpos_gamma": 0.0}, "position.xpos_gamma"),
    ({"position.kind": "t5", "position.t5_max_distance": 8}, "position.t5_max_distance"),
    ({"position.tupe_t5": True}, "position.tupe_t5"),
    ({"norm.kind": "batchnorm"}, "norm.kind"),
    ({"norm.placement": "sandwich"}, "norm.placement"),
    ({"norm.eps": 0.0}, "norm.eps"),
    ({"feedforward.kind": "relu3"}, "feedforward.kind"),
    ({"feedforward.mult": 0.0}, "feedforward.mult"),
    ({"dropout": 1.0}, "dropout"),
    ({"max_positions": 0}, "max_positions"),
    ({"init_std": -1.0}, "init_std"),
    ({"attention.nope": 1}, "attention.nope"),
    ({"layers": "many"}, "layers"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[f for _, f in BAD])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as info:
        memlm.build("seed-tiny", **overrides)
    assert info.value.field_name == field
    assert field in str(info.value)


def test_unknown_preset_lists_the_allowed_names():
    with pytest.raises(ConfigError, match="seed-tiny"):
        memlm.build("seed-huge")


def test_overrides_do_not_mutate_the_original():
    config = get_preset("seed-tiny")
    changed = apply_overrides(config, {"layers": 1})
    assert config.layers == 4 and changed.layers == 1


def test_depth_dependent_preset_keeps_long_memory_in_the_top_sixth_and_short_memory_below():
    small = get_preset("seed-xl-top-small")
    assert small.memory_lengths() == [128] * 10 + [512] * 2
    assert get_preset("seed-xl-top-tiny").memory_lengths() == [64, 64, 64, 256]


def test_xl_knn_preset_is_knn_plus_one_segment_of_recurrence():
    knn, xl_knn = get_preset("seed-knn-small"), get_preset("seed-xl-knn-small")
    assert xl_knn.memory.xl.length == xl_knn.seq_len == 512 and knn.memory.xl.length == 0
    assert dataclasses.replace(xl_knn, memory=knn.memory) == knn  # nothing else differs


def test_xl2_knn_preset_is_seed_xl_knn_with_gpt2_blocks_and_two_segments():
    """xl2-knn-small is exactly seed-xl-knn-small with these overrides."""
    raced = resolve("seed-xl-knn-small", **{
        "dropout": 0.2, "feedforward.dropout": 0.2, "attention.dropout": 0.1, "memory.train_reset": 0.1,
        "norm.kind": "layernorm", "feedforward.kind": "gelu", "attention.kv_heads": 8,
        "attention.qk_norm": False, "bias": True, "position.rope_dim": 32, "memory.xl.length": 1024})
    assert get_preset("xl2-knn-small") == raced
    tiny = get_preset("xl2-knn-tiny")
    assert tiny.memory_lengths() == [512] * 4 and tiny.position.rope_dim == 16 and tiny.memory.knn.layers == [2]


def test_xl4_xpos_knn_preset_is_xl2_knn_with_xpos_and_four_segments():
    """xl4-xpos-knn-small is xl2-knn-small with these overrides, and evaluates with twice the memory
    it trains with."""
    raced = resolve("xl2-knn-small", **{"position.kind": "xpos", "memory.xl.length": 2048,
                                        "memory.xl.eval_multiplier": 2.0})
    small = get_preset("xl4-xpos-knn-small")
    assert small == raced
    assert small.memory_lengths(training=True) == [2048] * 12 and small.memory_lengths(training=False) == [4096] * 12
    assert small.position.rope_dim == 32 and get_preset("xl4-xpos-knn-tiny").memory_lengths() == [1024] * 4


def test_depth_xpos_knn_preset_grows_memory_with_depth():
    """depth-xpos-knn-small is xl4-xpos-knn-small with one segment of memory in the lower six layers
    and four in the upper six, doubled in evaluation."""
    raced = resolve("xl4-xpos-knn-small", **{"memory.xl.lengths": [512] * 6 + [2048] * 6})
    small = get_preset("depth-xpos-knn-small")
    assert small == raced
    assert small.memory_lengths(training=False) == [1024] * 6 + [4096] * 6
    assert get_preset("depth-xpos-knn-tiny").memory_lengths() == [256, 256, 1024, 1024]
    assert get_preset("depth-xpos-knn-base").memory_lengths() == [1024] * 6 + [4096] * 6


def test_a_config_saved_before_the_memory_sections_loads_through_the_converter(tmp_path):
    """Run directories hold configs with flat memory fields (memory.knn_k, memory.length, ...):
    each old field lands in its section with its value, in JSON and TOML alike."""
    expected = resolve("seed-mem-tiny", **{"memory.knn.layers": [1], "memory.knn.k": 8,
                                           "memory.tokens.count": 2, "memory.tokens.recurrent": True,
                                           "memory.xl.eval_multiplier": 2.0})
    flat = {"length": 256, "feedback": "memory", "adaptive_span": True, "span_init": 0.5, "compress_rate": 4,
            "compress_length": 64, "persistent": 16, "knn_layers": [1], "knn_k": 8, "tokens": 2,
            "tokens_recurrent": True, "eval_multiplier": 2.0, "train_reset": 0.0}
    old = expected.to_dict()
    old["memory"] = flat
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert ModelConfig.load(tmp_path / "config.json") == expected
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in old.items() if not isinstance(v, (dict, type(None))))
    for section in ("attention", "position", "norm", "feedforward", "memory"):
        text += f"\n[{section}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in old[section].items()
                                               if v is not None)
    (tmp_path / "config.toml").write_text(text + "\n")
    assert ModelConfig.load(tmp_path / "config.toml") == expected


def test_an_old_flat_override_says_where_the_field_moved():
    with pytest.raises(ConfigError, match="moved to memory.knn.k"):
        resolve("seed-tiny", **{"memory.knn_k": 4})
    with pytest.raises(ConfigError, match="is a section"):
        resolve("seed-tiny", **{"memory.xl": 4})


def test_the_config_layer_loads_without_torch():
    """Configs are read, checked and written without importing torch or the model layers."""
    code = ("import sys; import memlm.config as c; c.resolve('seed-mem-tiny').to_dict(); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('memlm.') "
            "and not m.startswith('memlm.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_preset_counts_its_parameters_on_the_meta_device():
    """The large and xl sizes (351M and 1.24B for seed) are counted without allocating them."""
    import torch

    from memlm.model import LanguageModel
    counts = {}
    with torch.device("meta"):
        for name in memlm.presets():
            counts[name] = LanguageModel(get_preset(name)).num_parameters()
    assert counts["seed-large"] == counts["seed-xl-large"] == 350_618_724
    assert counts["seed-xl"] == counts["seed-xl-xl"] == 1_239_041_745
    assert counts["vanilla-xl"] == 1_477_611_200 and counts["seed-mem-xl"] > counts["seed-xl"]
