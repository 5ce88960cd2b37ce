"""Layer-wise KV streaming between two real worker processes (--kv-layerwise on, gRPC bytes):
the prefill worker ships each chunk's blocks layer by layer, mid-forward; decode assembles
them. Checked: the tokens equal the in-process engine's with no prompt token computed on
decode, every block is back on both sides, a duplicated layer piece is refused and a prefill
killed mid-stream costs a local prefill of what was missing, with the same tokens."""

from __future__ import annotations

import os

import pytest

from services.cli.stack import Child
from tests.conftest import make_llm
from tests.test_services import decode_directly, expected_tokens, kv_faults, spawn, stop, wait_serving, wait_workers_free

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

PROMPT = list(range(3000, 3150))  # 150 tokens: 9 full blocks of 16 + a partial block of 6
PREFILL_FLAGS = ["--kv-layerwise", "on", "--kv-transport", "grpc", "--max-num-batched-tokens", "64",
                 "--kv-cache-memory", "64MiB", "--grace", "1"]  # chunks of 64 tokens: blocks 0-3, 4-7, 8-9


@pytest.fixture(scope="module")
def reference():
    return make_llm("tiny-llama")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layerwise")
    prefill = spawn(tmp, "prefill", PREFILL_FLAGS)
    decode = spawn(tmp, "decode", ["--kv-transport", "grpc", "--kv-cache-memory", "64MiB", "--grace", "1",
                                   "--prefill-peers", f"p={prefill.address}", "--kv-progress-timeout", "10"])
    try:
        wait_serving(prefill)
        wait_serving(decode)
        yield prefill, decode
    finally:
        stop(decode)
        stop(prefill)


def restart(child: Child, env: dict | None = None) -> None:
    """Start `child` again on its address, as a supervisor would."""
    stop(child)
    child.start({**os.environ, **(env or {})})
    wait_serving(child)


def test_layerwise_blocks_give_the_in_process_tokens_and_every_block_comes_back(workers, reference):
    prefill, decode = workers
    result = decode_directly(decode, PROMPT, "p")
    d = result.disaggregation
    assert (d.remote_prefill, d.kv_transport, d.decode_computed_prompt_tokens, d.kv_blocks_shipped) == (
        True, "grpc", 0, 10)
    assert result.completions[0].token_ids == expected_tokens(reference, PROMPT)[0]
    wait_workers_free([prefill, decode])


def test_a_duplicated_layer_piece_is_refused_and_decode_prefills_itself(workers, reference):
    prefill, decode = workers
    restart(prefill, kv_faults("PDSERVE_TEST_DUPLICATE_LAYER_PIECE"))
    prompt = [t + 1 for t in PROMPT]
    result = decode_directly(decode, prompt, "p")
    # The first chunk's layer-1 pieces all claim layer 0: no block is ever whole.
    assert result.disaggregation.decode_computed_prompt_tokens == len(prompt)
    assert result.completions[0].token_ids == expected_tokens(reference, prompt)[0]
    wait_workers_free([prefill, decode])


def test_a_prefill_killed_mid_stream_falls_back_to_a_local_prefill(workers, reference):
    prefill, decode = workers
    restart(prefill, kv_faults("PDSERVE_TEST_DIE_MID_LAYERWISE"))
    prompt = [t + 2 for t in PROMPT]
    result = decode_directly(decode, prompt, "p")
    assert not prefill.alive()
    # Blocks 0-3 went out before the prefill died; decode computes at least the rest (all of
    # it if the dying process's last messages never left its socket).
    assert result.disaggregation.decode_computed_prompt_tokens in (len(prompt) - 64, len(prompt))
    assert result.completions[0].token_ids == expected_tokens(reference, prompt)[0]
    wait_workers_free([decode])
