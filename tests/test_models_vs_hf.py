"""Every architecture's greedy tokens equal transformers' generate() over the same weights.

Each case is a tiny random-weight model (float32, CPU). One state dict is built per case,
from `dummy_weights` plus noise on every 1-D tensor (HF init leaves biases at zero and norm
scales at one, which would hide a dropped bias or q/k norm), loaded into the transformers
model and saved as an HF directory that our engine loads like any checkpoint.

Each case asserts its reference has at least 8 distinct tokens out of 32 per prompt, so
degenerate weights (a model that repeats one token) cannot pass by accident.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

from services.engine import LLM, SamplingParams, loader
from services.engine.presets import preset_config
from tests.conftest import assert_all_free

VOCAB = 49152
NEW_TOKENS = 32
# A one-token prompt, prompts inside one block, exactly one block (16), and several blocks.
PROMPT_LENS = (1, 7, 16, 45, 97)
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


pytestmark = pytest.mark.usefixtures("one_torch_thread")

_TINY_DECODER = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
    vocab_size=VOCAB, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
)
# Frequencies of a 16-wide head at theta 1e4 have wavelengths 6..19869 positions; with
# original_max_position_embeddings 256 (high-frequency cut at 64) the llama3 rule keeps the
# two fastest, smooths one and divides the rest by `factor`, all within 130 positions.
_LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256, "rope_theta": 10000.0,
}


def _preset(name: str, initializer_range: float) -> Any:
    config = preset_config(name)
    # HF's 0.02 makes tied-embedding models echo their last input token; a wider init does not.
    config.initializer_range = initializer_range
    return config


def _config(model_type: str, **fields: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**_TINY_DECODER, **fields})


CASES = {
    "tiny-llama": lambda: _preset("tiny-llama", 0.02),
    "tiny-qwen2": lambda: _preset("tiny-qwen2", 0.2),
    "tiny-qwen3": lambda: _preset("tiny-qwen3", 0.2),
    "tiny-gpt2": lambda: _preset("tiny-gpt2", 1.0),
    # A window wider than the context: Mistral's architecture, full attention.
    "mistral": lambda: _config(
        "mistral", sliding_window=4096, rope_parameters={"rope_type": "default", "rope_theta": 1e6}
    ),
    "llama3-rope": lambda: _config("llama", rope_parameters=_LLAMA3_ROPE, initializer_range=0.05),
}


def _perturbed_weights(hf_config: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """dummy_weights with every bias and norm scale moved off its HF init (zeros / ones)."""
    weights = dict(loader.dummy_weights(hf_config, seed))
    g = torch.Generator().manual_seed(seed)
    for name, tensor in weights.items():
        if tensor.dim() == 1:
            scale = 0.5 if name.endswith("bias") else 0.2
            weights[name] = tensor + scale * torch.randn(tensor.shape, generator=g)
    return weights


def _hf_model(hf_config: Any, weights: dict[str, torch.Tensor]) -> Any:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    result = hf.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == []
    tied = ["lm_head.weight"] if hf_config.tie_word_embeddings else []
    assert result.missing_keys == tied
    if tied:  # the head must share the (loaded) embedding, not keep its own init
        assert hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    return hf


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(hf: Any, prompts: list[list[int]]) -> list[list[int]]:
    refs = []
    with torch.no_grad():
        for prompt in prompts:
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )
            refs.append(out[0, len(prompt):].tolist())
    return refs


@functools.cache
def _case(name: str) -> tuple[Any, dict[str, torch.Tensor], list[list[int]]]:
    """(config, weights, HF greedy tokens per prompt) of a case, computed once per session."""
    hf_config = CASES[name]()
    weights = _perturbed_weights(hf_config)
    return hf_config, weights, _hf_greedy(_hf_model(hf_config, weights), _prompts())


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    """The default model's tokenizer: every case uses its 49152-token vocabulary."""
    return str(loader.gguf_to_hf_dir(loader.default_model_path(), loader.default_cache_dir(), weights=False))


def _save_hf_dir(path: Path, hf_config: Any, weights: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    hf_config.save_pretrained(str(path))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    return path


def _our_greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [list(out.outputs[0].token_ids) for out in llm.generate(prompts, GREEDY)]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_transformers_generate(case, tmp_path, tokenizer_dir):
    hf_config, weights, expected = _case(case)
    assert [len(ref) for ref in expected] == [NEW_TOKENS] * len(PROMPT_LENS)  # eos did not stop HF
    for ref in expected:
        assert len(set(ref)) >= 8, f"degenerate reference {ref}"

    llm = LLM(model=str(_save_hf_dir(tmp_path, hf_config, weights)), tokenizer=tokenizer_dir,
              max_model_len=512, num_kv_blocks=64)

    # All prompts in one batch through our engine; HF ran each one alone.
    assert _our_greedy(llm, _prompts()) == expected
    assert_all_free(llm)


def test_qwen2_qkv_biases_and_qwen3_qk_norms_are_not_at_their_init():
    """The qwen cases above exercise bias and q/k-norm handling only if those are non-trivial."""
    _, qwen2, _ = _case("tiny-qwen2")
    biases = [n for n in qwen2 if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    assert len(biases) == 6
    assert all(qwen2[n].abs().min() > 0 for n in biases)
    _, qwen3, _ = _case("tiny-qwen3")
    norms = [n for n in qwen3 if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 4
    assert all(not torch.equal(qwen3[n], torch.ones_like(qwen3[n])) for n in norms)


def test_llama3_rope_case_differs_from_default_rope():
    """Proves the llama3 case is sensitive to the RoPE scaling it claims to cover."""
    hf_config, weights, expected = _case("llama3-rope")
    plain = _config("llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.05)
    assert _hf_greedy(_hf_model(plain, weights), _prompts()) != expected


def test_chunked_prefill_preemption_and_prefix_hits_keep_hf_tokens(tmp_path, tokenizer_dir):
    """A 13-token step budget splits prompts mid-block, a 16-block pool cannot hold all five
    sequences (they need 23 blocks) so one is preempted and recomputed, and a second run of
    the same prompts starts from prefix-cache hits: none of it may change a greedy token."""
    hf_config, weights, expected = _case("llama3-rope")
    assert sum(-(-(n + NEW_TOKENS) // 16) for n in PROMPT_LENS) == 23
    llm = LLM(model=str(_save_hf_dir(tmp_path, hf_config, weights)), tokenizer=tokenizer_dir,
              max_model_len=256, num_kv_blocks=16, max_num_batched_tokens=13)
    steps: list[int] = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda plan, *hook: steps.append(plan.num_tokens) or execute(plan, *hook)

    assert _our_greedy(llm, _prompts()) == expected
    assert max(steps) == 13
    assert llm.engine.scheduler.num_preemptions >= 1
    computed_first = sum(steps)
    steps.clear()

    assert _our_greedy(llm, _prompts()) == expected
    assert sum(steps) < computed_first  # prefix-cache hits skipped some prompt tokens
    assert_all_free(llm)
