"""Where weights come from: deterministic dummy weights, typed load errors, the GGUF cache,
and the KV pool sized from the memory it is given."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from services.engine import LLM, SamplingParams, loader
from services.engine.errors import ConfigError, InvalidRequestError, ModelLoadError
from services.engine.presets import PRESETS, preset_config
from tests.conftest import assert_all_free, make_llm

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5], [100, 2000, 30000, 49151]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _greedy(llm: LLM) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    return str(loader.gguf_to_hf_dir(loader.default_model_path(), loader.default_cache_dir(), weights=False))


def _hf_dir(path: Path, weights: dict[str, torch.Tensor], preset: str = "tiny-llama") -> Path:
    """An HF model directory (config.json + model.safetensors) of a tiny preset."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    preset_config(preset).save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


# ---- the source a follower rank gets from rank 0 -------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_source_sent_as_json_builds_the_same_model_config_rope_and_dummy_weights(preset):
    """A follower rank starts from rank 0's resolved source as JSON text (no pickle): the same
    architecture facts, RoPE tables (llama3 scaling needs transformers' own config class) and,
    for dummy weights, the same tensors under the same names without a transformers skeleton."""
    from services.engine.layers.rotary import RotaryEmbedding
    from services.engine.models.config import ModelConfig

    source = loader.resolve(None, "dummy", preset, 3)
    text = loader.source_to_json(source)
    sent = loader.source_from_json(text)
    assert (sent.identity, sent.name, sent.dummy_seed, sent.weights_dir) == (source.identity, source.name, 3, None)
    cfg, sent_cfg = ModelConfig.from_hf(source.hf_config), ModelConfig.from_hf(sent.hf_config)
    assert sent_cfg == cfg
    if cfg.model_type != "gpt2":
        rope, sent_rope = (RotaryEmbedding(c.hf_config, c.head_dim, 256) for c in (cfg, sent_cfg))
        assert sent_rope.cos.equal(rope.cos) and sent_rope.sin.equal(rope.sin)
    if preset.startswith("tiny-"):  # the others' dummy weights are gigabytes
        weights, sent_weights = dict(loader.iter_weights(source)), dict(loader.iter_weights(sent))
        assert list(sent_weights) == list(weights)
        assert all(sent_weights[name].equal(w) for name, w in weights.items())


def test_a_checkpoint_source_sent_as_json_names_its_weights_directory(tmp_path):
    hf_dir = _hf_dir(tmp_path / "ckpt", dict(loader.dummy_weights(preset_config("tiny-llama"), 0)))
    source = loader.resolve(str(hf_dir))
    sent = loader.source_from_json(loader.source_to_json(source))
    assert (sent.weights_dir, sent.identity, sent.dummy_shapes) == (hf_dir, source.identity, None)
    assert list(loader.iter_weights(sent)) and sent.tokenizer_dir is None  # rank 0 alone tokenizes


# ---- dummy weights -----------------------------------------------------------------------------


def test_dummy_weights_are_identical_for_the_same_seed_and_differ_for_another():
    config = preset_config("tiny-llama")
    first = list(loader.dummy_weights(config, 3))
    again = list(loader.dummy_weights(config, 3))
    other = dict(loader.dummy_weights(config, 4))
    assert [name for name, _ in first] == [name for name, _ in again]
    assert len(first) == 2 + 2 * 9 + 1  # embed, lm_head; 9 per layer; final norm
    for (name, a), (_, b) in zip(first, again, strict=True):
        assert torch.equal(a, b), name
        if a.dim() >= 2:
            assert not torch.equal(a, other[name]), name
        else:  # norm scales do not depend on the seed
            assert torch.equal(a, other[name]), name


def test_dummy_weight_of_a_parameter_does_not_depend_on_the_other_parameters():
    """Seeded per (seed, name): a 1-layer model's layer 0 is the 2-layer model's layer 0."""
    two = dict(loader.dummy_weights(preset_config("tiny-llama"), 0))
    config = preset_config("tiny-llama")
    config.num_hidden_layers = 1
    one = dict(loader.dummy_weights(config, 0))
    assert set(one) == {n for n in two if ".layers.1." not in n}
    assert all(torch.equal(one[n], two[n]) for n in one)


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3", "tiny-gpt2"])
def test_dummy_norm_scales_are_ones_and_biases_zeros(preset):
    vectors = {n: t for n, t in loader.dummy_weights(preset_config(preset), 0) if t.dim() == 1}
    biases = [n for n in vectors if n.endswith("bias")]
    scales = [n for n in vectors if not n.endswith("bias")]
    expected_biases = {"tiny-qwen2": 6, "tiny-qwen3": 0, "tiny-gpt2": 2 * 6 + 1}[preset]
    expected_scales = {"tiny-qwen2": 5, "tiny-qwen3": 9, "tiny-gpt2": 5}[preset]
    assert (len(biases), len(scales)) == (expected_biases, expected_scales)
    assert all(torch.equal(vectors[n], torch.zeros_like(vectors[n])) for n in biases)
    assert all(torch.equal(vectors[n], torch.ones_like(vectors[n])) for n in scales)


@pytest.mark.parametrize("initializer_range", [0.02, 0.1])
def test_dummy_matrices_are_normal_with_the_configs_initializer_range(initializer_range):
    config = preset_config("tiny-llama")
    config.initializer_range = initializer_range
    for name, tensor in loader.dummy_weights(config, 0):
        if tensor.dim() >= 2:  # >= 4096 samples each: std within 10%, mean near 0
            assert abs(tensor.std().item() / initializer_range - 1) < 0.1, name
            assert abs(tensor.mean().item()) < 0.1 * initializer_range, name


def test_engines_with_the_same_dummy_seed_generate_the_same_tokens():
    a = make_llm("tiny-llama", dummy_seed=5, num_kv_blocks=64)
    b = make_llm("tiny-llama", dummy_seed=5, num_kv_blocks=64)
    c = make_llm("tiny-llama", dummy_seed=6, num_kv_blocks=64)
    tokens = _greedy(a)
    assert len(set(tokens[0])) > 1  # not a constant model that would match anything
    assert _greedy(b) == tokens
    assert _greedy(c) != tokens
    assert a.engine.layout.model_identity == "dummy:tiny-llama:seed=5"
    assert c.engine.layout.model_identity == "dummy:tiny-llama:seed=6"
    for llm in (a, b, c):
        assert_all_free(llm)


# ---- load errors -------------------------------------------------------------------------------


def test_unknown_model_path_is_a_model_load_error_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match=f"model path does not exist: {re.escape(str(missing))}$"):
        LLM(model=str(missing), max_model_len=64)


def test_directory_without_config_json_is_a_model_load_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=re.escape(f"{tmp_path} is not a model directory (no config.json)")):
        LLM(model=str(tmp_path), max_model_len=64)


def test_corrupt_safetensors_is_a_model_load_error_at_engine_build(tmp_path, tokenizer_dir):
    preset_config("tiny-llama").save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x07not a safetensors file" * 64)
    file = re.escape(str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=f"^cannot read weights file {file}: "):
        LLM(model=str(tmp_path), tokenizer=tokenizer_dir, max_model_len=64, num_kv_blocks=8)


def test_corrupt_gguf_is_a_model_load_error_and_publishes_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not gguf at all" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match=f"^cannot read GGUF file {re.escape(str(bad))}: "):
        LLM(model=str(bad), cache_dir=cache, max_model_len=64)
    assert list((cache / "gguf").iterdir()) == []  # neither a result nor a temporary directory


def test_unknown_preset_is_a_model_load_error_listing_the_known_ones():
    known = ", ".join(sorted(PRESETS))
    assert "tiny-llama, tiny-qwen2" in known
    with pytest.raises(ModelLoadError, match=f"^unknown preset 'tiny-bert'; known: {re.escape(known)}$"):
        make_llm("tiny-bert")


def test_preset_without_dummy_load_format_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="^--preset needs --load-format dummy$"):
        LLM(preset="tiny-llama", max_model_len=64)


def test_checkpoint_missing_a_weight_is_a_model_load_error_naming_it(tmp_path, tokenizer_dir):
    weights = dict(loader.dummy_weights(preset_config("tiny-llama"), 0))
    del weights["model.layers.1.mlp.down_proj.weight"]
    model = _hf_dir(tmp_path / "m", weights)
    message = r"^checkpoint is missing 1 weights: model\.layers\.1\.mlp\.down_proj\.weight$"
    with pytest.raises(ModelLoadError, match=message):
        LLM(model=str(model), tokenizer=tokenizer_dir, max_model_len=64, num_kv_blocks=8)


def test_checkpoint_missing_one_shard_of_a_fused_weight_is_a_model_load_error(tmp_path, tokenizer_dir):
    """q and v alone fill most of qkv_proj; the missing k shard must still be noticed."""
    weights = dict(loader.dummy_weights(preset_config("tiny-llama"), 0))
    del weights["model.layers.0.self_attn.k_proj.weight"]
    model = _hf_dir(tmp_path / "m", weights)
    # Named by the fused parameter it is a shard of.
    message = r"^checkpoint is missing 1 weights: model\.layers\.0\.self_attn\.qkv_proj\.weight$"
    with pytest.raises(ModelLoadError, match=message):
        LLM(model=str(model), tokenizer=tokenizer_dir, max_model_len=64, num_kv_blocks=8)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        ("model.layers.0.mlp.down_proj.weight", (128, 64), (64, 128)),  # transposed
        ("model.layers.1.self_attn.k_proj.weight", (64, 64), (32, 64)),  # a fused shard
    ],
)
def test_wrong_shape_weight_is_a_model_load_error(tmp_path, tokenizer_dir, name, shape, expected):
    weights = dict(loader.dummy_weights(preset_config("tiny-llama"), 0))
    weights[name] = torch.zeros(shape)
    model = _hf_dir(tmp_path / "m", weights)
    message = f"^weight {re.escape(name)} has shape {re.escape(str(shape))}, expected {re.escape(str(expected))}$"
    with pytest.raises(ModelLoadError, match=message):
        LLM(model=str(model), tokenizer=tokenizer_dir, max_model_len=64, num_kv_blocks=8)


def test_checkpoint_from_the_same_weights_generates_the_dummy_engines_tokens(tmp_path, tokenizer_dir):
    """The error tests above load through this path; it must also load correctly."""
    weights = dict(loader.dummy_weights(preset_config("tiny-llama"), 5))
    model = _hf_dir(tmp_path / "m", weights)
    from_dir = LLM(model=str(model), tokenizer=tokenizer_dir, max_model_len=512, num_kv_blocks=64)
    dummy = make_llm("tiny-llama", dummy_seed=5, num_kv_blocks=64)
    assert _greedy(from_dir) == _greedy(dummy)


def test_weights_only_directory_runs_on_token_ids_without_a_tokenizer(tmp_path):
    weights = dict(loader.dummy_weights(preset_config("tiny-llama"), 5))
    llm = LLM(model=str(_hf_dir(tmp_path / "m", weights)), max_model_len=512, num_kv_blocks=64)
    assert llm.tokenizer is None
    assert _greedy(llm) == _greedy(make_llm("tiny-llama", dummy_seed=5, num_kv_blocks=64))
    assert all(out.outputs[0].text == "" for out in llm.generate(PROMPTS, GREEDY))
    with pytest.raises(InvalidRequestError, match="no tokenizer"):
        llm.generate("a text prompt", GREEDY)
    with pytest.raises(InvalidRequestError, match="stop strings need a tokenizer"):
        llm.generate(PROMPTS[0], SamplingParams(stop=["x"]))


def test_unreadable_tokenizer_is_a_model_load_error(tmp_path):
    model = _hf_dir(tmp_path / "m", dict(loader.dummy_weights(preset_config("tiny-llama"), 5)))
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer"):
        LLM(model=str(model), max_model_len=64, num_kv_blocks=8)


# ---- GGUF conversion cache ---------------------------------------------------------------------


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_publish_keeps_an_existing_complete_result(tmp_path):
    out, tmp = tmp_path / "model-abc", tmp_path / ".model-abc-tmp"
    out.mkdir()
    (out / "config.json").write_text("winner")
    tmp.mkdir()
    (tmp / "config.json").write_text("loser")
    loader._publish(tmp, out, "config.json")
    assert _files(out) == {"config.json": b"winner"}
    assert _files(tmp) == {"config.json": b"loser"}  # left for the caller to remove


def test_publish_replaces_a_partial_result_and_leaves_no_stale_directory(tmp_path):
    out, tmp = tmp_path / "model-abc", tmp_path / ".model-abc-tmp"
    out.mkdir()
    (out / "config.json").write_text("tokenizer-only")
    tmp.mkdir()
    (tmp / "config.json").write_text("full")
    (tmp / "model.safetensors").write_text("weights")
    loader._publish(tmp, out, "model.safetensors")
    assert _files(out) == {"config.json": b"full", "model.safetensors": b"weights"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-abc"]


@pytest.fixture
def fake_conversion(monkeypatch):
    """_convert_gguf replaced by one that writes tiny files and records its calls."""
    calls: list[tuple[str, bool]] = []

    def convert(path: Path, dest: Path, weights: bool) -> None:
        calls.append((path.name, weights))
        (dest / "config.json").write_text(f"call {len(calls)}")
        if weights:
            (dest / "model.safetensors").write_text(f"call {len(calls)}")

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    return calls


def test_gguf_conversion_is_cached_by_content_and_not_repeated(tmp_path, fake_conversion):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake content")
    cache = tmp_path / "cache"
    first = loader.gguf_to_hf_dir(gguf, cache, weights=False)
    assert first == cache / "gguf" / f"tiny-{loader._file_digest(gguf)}"
    assert loader.gguf_to_hf_dir(gguf, cache, weights=False) == first
    assert fake_conversion == [("tiny.gguf", False)]
    assert [p.name for p in (cache / "gguf").iterdir()] == [first.name]  # no temporary left
    assert _files(first) == {"config.json": b"call 1"}


def test_gguf_with_weights_reconverts_a_tokenizer_only_result_once(tmp_path, fake_conversion):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake content")
    cache = tmp_path / "cache"
    out = loader.gguf_to_hf_dir(gguf, cache, weights=False)
    assert loader.gguf_to_hf_dir(gguf, cache, weights=True) == out
    assert loader.gguf_to_hf_dir(gguf, cache, weights=True) == out
    assert loader.gguf_to_hf_dir(gguf, cache, weights=False) == out
    assert fake_conversion == [("tiny.gguf", False), ("tiny.gguf", True)]
    assert _files(out) == {"config.json": b"call 2", "model.safetensors": b"call 2"}
    assert [p.name for p in (cache / "gguf").iterdir()] == [out.name]


def test_changed_gguf_content_gets_its_own_cache_directory(tmp_path, fake_conversion):
    gguf = tmp_path / "tiny.gguf"
    cache = tmp_path / "cache"
    gguf.write_bytes(b"version 1")
    old = loader.gguf_to_hf_dir(gguf, cache, weights=False)
    gguf.write_bytes(b"version 2")
    new = loader.gguf_to_hf_dir(gguf, cache, weights=False)
    assert old != new
    assert len(fake_conversion) == 2


def test_failed_gguf_conversion_leaves_nothing_in_the_cache(tmp_path, monkeypatch):
    def convert(path: Path, dest: Path, weights: bool) -> None:
        (dest / "config.json").write_text("half written")
        raise ModelLoadError("cannot read GGUF file: boom")

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF fake content")
    with pytest.raises(ModelLoadError, match="boom"):
        loader.gguf_to_hf_dir(gguf, tmp_path / "cache", weights=False)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_default_model_tokenizer_directory_is_reused_without_conversion(monkeypatch):
    """The real default GGUF, already converted by the session (or the line before): no rework."""
    first = loader.gguf_to_hf_dir(loader.default_model_path(), loader.default_cache_dir(), weights=False)

    def convert(*args) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    again = loader.gguf_to_hf_dir(loader.default_model_path(), loader.default_cache_dir(), weights=False)
    assert again == first
    assert (first / "config.json").is_file()
    assert (first / "tokenizer.json").is_file()


# ---- KV pool sizing ----------------------------------------------------------------------------

# K and V, per layer, per KV head, head_dim floats of 4 bytes, 16 tokens a block.
BYTES_PER_BLOCK = {
    "tiny-llama": 2 * 2 * 2 * 16 * 16 * 4,  # 2 layers, 2 KV heads, head_dim 16
    "tiny-qwen3": 2 * 2 * 2 * 32 * 16 * 4,  # head_dim 32
    "tiny-gpt2": 2 * 2 * 4 * 16 * 16 * 4,  # 4 heads of 16, no GQA
}


@pytest.mark.parametrize("preset", list(BYTES_PER_BLOCK))
def test_kv_pool_gets_every_whole_block_the_memory_budget_holds(preset):
    memory = 40 * BYTES_PER_BLOCK[preset] + BYTES_PER_BLOCK[preset] - 1
    llm = make_llm(preset, kv_cache_memory=memory, max_model_len=256)
    assert llm.engine.layout.num_kv_blocks == 40
    assert llm.engine.block_manager.num_free_blocks == 40
    assert llm.engine.runner.kv_cache.numel() * 4 == 40 * BYTES_PER_BLOCK[preset]


def test_kv_pool_exactly_one_max_length_request_is_accepted():
    llm = make_llm("tiny-llama", kv_cache_memory=16 * BYTES_PER_BLOCK["tiny-llama"], max_model_len=256)
    assert llm.engine.layout.kv_capacity_tokens == 256


def test_kv_pool_smaller_than_max_model_len_is_a_config_error():
    message = r"KV pool \(15 blocks of 16 tokens\) cannot hold one request of max_model_len=256 tokens"
    with pytest.raises(ConfigError, match=message):
        make_llm("tiny-llama", kv_cache_memory=16 * BYTES_PER_BLOCK["tiny-llama"] - 1, max_model_len=256)


def test_max_model_len_above_the_models_context_is_a_config_error():
    with pytest.raises(ConfigError, match="^max_model_len 1025 exceeds the model's context of 1024 tokens$"):
        make_llm("tiny-llama", max_model_len=1025, num_kv_blocks=128)
