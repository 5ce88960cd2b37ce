"""Layer-wise KV streaming between two real worker processes (--kv-layerwise on, gRPC bytes):
the prefill worker ships each chunk's blocks layer by layer, mid-forward; decode assembles
them. Checked: the tokens equal the in-process engine's with no prompt token computed on
decode, every block is back on both sides, a duplicated layer piece is refused and a prefill
killed mid-stream costs a local prefill of what was missing, with the same tokens."""

from __future__ import annotations

import pytest

from tests.conftest import make_llm
from tests.test_services import decode_directly, expected_tokens, kv_faults, spawn, stop, wait_serving, wait_workers_free

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

PROMPT = list(range(3000, 3150))  # 150 tokens: 9 full blocks of 16 + a partial block of 6
PREFILL_FLAGS = ["--kv-layerwise", "on", "--kv-transport", "grpc", "--max-num-batched-tokens", "64",
                 "--kv-cache-memory", "64MiB", "--grace", "1"]  # chunks of 64 tokens: blocks 0-3, 4-7, 8-9


@pytest.fixture(scope="module")
def reference():
    return make_llm("tiny-llama")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Decode with three layer-wise prefill peers, started together: intact ("p"), one that
    duplicates layer pieces ("dup") and one that dies mid-stream ("die")."""
    tmp = tmp_path_factory.mktemp("layerwise")
    prefills = {"p": spawn(tmp, "prefill", PREFILL_FLAGS),
                "dup": spawn(tmp, "prefill", PREFILL_FLAGS, kv_faults("PDSERVE_TEST_DUPLICATE_LAYER_PIECE")),
                "die": spawn(tmp, "prefill", PREFILL_FLAGS, kv_faults("PDSERVE_TEST_DIE_MID_LAYERWISE"))}
    peers = ",".join(f"{name}={child.address}" for name, child in prefills.items())
    decode = spawn(tmp, "decode", ["--kv-transport", "grpc", "--kv-cache-memory", "64MiB", "--grace", "1",
                                   "--prefill-peers", peers, "--kv-progress-timeout", "10"])
    try:
        for child in (*prefills.values(), decode):
            wait_serving(child, timeout=300)
        yield prefills, decode
    finally:
        children = [decode, *prefills.values()]
        for child in children:  # all at once: each drains for its --grace
            if child.alive():
                child.proc.terminate()
        for child in children:
            stop(child)


def test_layerwise_blocks_give_the_in_process_tokens_and_every_block_comes_back(workers, reference):
    prefills, decode = workers
    result = decode_directly(decode, PROMPT, "p")
    d = result.disaggregation
    assert (d.remote_prefill, d.kv_transport, d.decode_computed_prompt_tokens, d.kv_blocks_shipped) == (
        True, "grpc", 0, 10)
    assert result.completions[0].token_ids == expected_tokens(reference, PROMPT)[0]
    wait_workers_free([prefills["p"], decode])


def test_a_duplicated_layer_piece_is_refused_and_decode_prefills_itself(workers, reference):
    prefills, decode = workers
    prompt = [t + 1 for t in PROMPT]
    result = decode_directly(decode, prompt, "dup")
    # The first chunk's layer-1 pieces all claim layer 0: no block is ever whole.
    assert result.disaggregation.decode_computed_prompt_tokens == len(prompt)
    assert result.completions[0].token_ids == expected_tokens(reference, prompt)[0]
    wait_workers_free([prefills["dup"], decode])


def test_a_prefill_killed_mid_stream_falls_back_to_a_local_prefill(workers, reference):
    prefills, decode = workers
    prompt = [t + 2 for t in PROMPT]
    result = decode_directly(decode, prompt, "die")
    assert not prefills["die"].alive()
    # Blocks 0-3 went out before the prefill died; decode computes at least the rest (all of
    # it if the dying process's last messages never left its socket).
    assert result.disaggregation.decode_computed_prompt_tokens in (len(prompt) - 64, len(prompt))
    assert result.completions[0].token_ids == expected_tokens(reference, prompt)[0]
    wait_workers_free([decode])
