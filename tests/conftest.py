"""Shared fixtures. Engines are expensive to start, so the real default model is loaded once
per session; tiny dummy-weight presets are cheap and built per test where a test needs its
own pool or budget."""

from __future__ import annotations

import gc
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module", autouse=True)
def free_engines_after_each_module():
    """Engines hold reference cycles, so their KV pools outlive a module until the collector
    runs: collect them, or the session's process grows module by module (the suite was
    OOM-killed at 8.8 GB on the 24 GB machine)."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def one_torch_thread():
    """For tiny models: 64-column matrices gain nothing from threads, and on a busy 2-core
    machine OpenMP workers waiting on each other made each step ~30x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def default_llm():
    """The default model (SmolLM2-135M-Instruct), float32 on CPU, shared by the whole session."""
    from services.engine import LLM

    return LLM(max_model_len=2048)


@pytest.fixture(scope="session")
def hf_default_model(default_llm):
    """transformers' own implementation over the same (cached, dequantized) weights."""
    from transformers import AutoModelForCausalLM

    from services.engine import loader

    source = loader.resolve(None)
    return AutoModelForCausalLM.from_pretrained(str(source.weights_dir), dtype=torch.float32).eval()


def make_llm(preset: str = "tiny-llama", **kwargs):
    """A fresh engine with dummy weights of a tiny preset (sub-second to build)."""
    from services.engine import LLM

    kwargs.setdefault("max_model_len", 512)
    if "num_kv_blocks" not in kwargs:  # the CPU default, 1 GiB, is resident memory the suite need not hold
        kwargs.setdefault("kv_cache_memory", 64 << 20)
    return LLM(load_format="dummy", preset=preset, **kwargs)


def assert_all_free(llm) -> None:
    """Every KV block is back in the pool and the engine holds no request."""
    llm.engine.block_manager.assert_all_free()
    assert not llm.engine.requests
    assert not llm.engine.scheduler.has_unfinished()
