"""The sampler on a GPU (marked `gpu`; run on the device): it queues every step without
waiting for the device, draws the reference distributions there too, and a seeded request
gives the same tokens through CUDA-graph steps as through eager ones, with async scheduling
on or off, whatever else is batched."""

from __future__ import annotations

import os

import pytest
import torch

from services.engine import SamplingParams
from services.engine.sampler import Sampler
from services.engine.scheduler import SampleSpec
from tests.conftest import make_llm
from tests.test_sampler_statistics import CASES, N, assert_matches_only, draw_counts, references, spec_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                                  reason="set TRITON_INTERPRET=0 to run GPU tests")]

EVERY_PARAMETER = [
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=50),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=0.9, min_p=0.1, seed=3),
    SamplingParams(temperature=0.7, repetition_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.1, seed=5),
    SamplingParams(temperature=0.0, logit_bias={3: 5.0}),
    SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[9]),
    SamplingParams(temperature=0.5, logprobs=3),
    SamplingParams(temperature=0.8, allowed_token_ids=range(0, 32_000, 3)),
]


def test_a_step_of_every_parameter_waits_for_nothing_on_the_device():
    vocab = 32_000
    specs = [SampleSpec(p, (0,), 3, [1, 2, 3, *range(10, 10 + i)]) for i, p in enumerate(EVERY_PARAMETER * 8)]
    logits = torch.randn(len(specs), vocab, device="cuda") * 3
    sampler = Sampler((2,), seed=0)
    sampler.sample(logits, specs).result()  # the first step builds the batch's tensors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [sampler.sample(logits, specs) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for batch in batches:
        assert all(0 <= g[0].token_id < vocab for g in batch.result())


@pytest.mark.parametrize("case", ["temperature 0.6", "top_p 0.8", "min_p 0.2", "top_k 3", "T 0.8 top_k 4 top_p 0.7",
                                  "T 0.7 min_p 0.05 top_k 5 top_p 0.85"])
def test_draw_frequencies_match_the_reference_on_the_gpu(case):
    (counts,) = draw_counts([spec_of(SamplingParams(**CASES[case][0]), N)], device="cuda")
    assert_matches_only(counts, *references(case))


PROMPTS = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate([5, 40, 77, 130, 16, 260, 1, 33])]


SEEDED = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=0.6, seed=12, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=0.7, repetition_penalty=1.1, seed=13, max_tokens=24, ignore_eos=True),
          SamplingParams(temperature=1.0, top_p=0.8, seed=14, max_tokens=24, ignore_eos=True)] * 2


def seeded_outputs(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SEEDED)]


@pytest.fixture(scope="module")
def eager_tokens():
    return seeded_outputs(make_llm("tiny-llama", dtype="float32", num_kv_blocks=4096, enforce_eager=True,
                                   async_scheduling=False))


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_seeded_tokens_through_cuda_graph_steps_match_eager_steps(eager_tokens, async_scheduling):
    llm = make_llm("tiny-llama", dtype="float32", num_kv_blocks=4096, async_scheduling=async_scheduling)
    assert llm.engine.runner.graphs is not None
    assert seeded_outputs(llm) == eager_tokens
    # one at a time: other batch compositions, the same tokens
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p, params in zip(PROMPTS, SEEDED, strict=True)]
    assert alone == eager_tokens


GRAPH_ROWS = [SamplingParams(temperature=0),
              SamplingParams(temperature=0.6),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11),
              SamplingParams(temperature=1.1, top_k=5),
              SamplingParams(temperature=0.9, min_p=0.1, seed=3),
              SamplingParams(temperature=1.0, top_k=64, top_p=0.5, min_p=0.05),
              SamplingParams(temperature=0.7, top_k=20, top_p=0.6, seed=4)] * 4


def test_a_decode_graphs_draw_gives_the_eager_samplers_tokens():
    """The filtered draw of a decode graph (sampler.draw_in_graph over a whole bucket: the
    staged rows, greedy ones among them, then padding), captured once and replayed with each
    step's staged values, gives the tokens the eager sampler draws from the same logits with
    the same uniforms (Sampler.in_graph's)."""
    from services.engine.sampler import GRAPH_TOP_K, draw_in_graph
    from services.engine.sampling_ops import Filters

    vocab, n, bucket = 128_256, len(GRAPH_ROWS), 32
    specs = [SampleSpec(p, (0,), 3, [1, 2, 3]) for p in GRAPH_ROWS]
    temperature, uniforms, top_p, min_p = torch.zeros(4, bucket, device="cuda")
    top_k = torch.zeros(bucket, dtype=torch.long, device="cuda")
    logits = torch.empty(bucket, vocab, dtype=torch.bfloat16, device="cuda")

    def stage(seed: int) -> None:
        staged = Sampler((2,), seed=seed).in_graph(specs, vocab, torch.device("cuda"))
        assert staged is not None and staged.filtered
        for buffer, values, padding in ((temperature, staged.temperature, 0.0), (uniforms, staged.uniforms, 0.0),
                                        (top_k, staged.top_k, 0), (top_p, staged.top_p, 1.0),
                                        (min_p, staged.min_p, 0.0)):
            buffer[:n].copy_(torch.from_numpy(values))
            buffer[n:] = padding

    def graph_step() -> torch.Tensor:
        drawn = draw_in_graph(logits, temperature, uniforms, Filters(top_k, top_p, min_p, GRAPH_TOP_K, False))
        return torch.where(temperature <= 0.0, logits.argmax(dim=-1), drawn)

    g = torch.Generator(device="cuda").manual_seed(0)
    logits.copy_(torch.randn(bucket, vocab, device="cuda", generator=g) * 4)
    stage(0)
    graph_step()  # Triton compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = graph_step()
    for seed, scale in ((0, 4.0), (7, 1.0), (8, 9.0)):  # new logits and uniforms in the same buffers
        logits.copy_(torch.randn(bucket, vocab, device="cuda", generator=g) * scale)
        stage(seed)
        graph.replay()
        eager = Sampler((2,), seed=seed).sample(logits[:n], specs).result()
        assert tokens[:n].tolist() == [row[0].token_id for row in eager], seed
