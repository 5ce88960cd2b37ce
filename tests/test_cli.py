"""The `pdserve` console script as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PDSERVE = [sys.executable, "-m", "services.cli.main"]


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*PDSERVE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_json_prints_one_object_per_prompt_in_input_order(tmp_path, default_llm):
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(["The capital of France is"]))
    proc = run("generate", "--json", "--max-tokens", "8", "What is AI?", "--prompts-file", str(prompts_file))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [rec["prompt"] for rec in lines] == ["What is AI?", "The capital of France is"]
    expected = default_llm.generate(["What is AI?", "The capital of France is"],
                                    __import__("services.engine", fromlist=["SamplingParams"]).SamplingParams(
                                        temperature=0, max_tokens=8))
    for rec, out in zip(lines, expected, strict=True):
        assert set(rec) >= {"prompt", "prompt_token_ids", "token_ids", "text", "finish_reason"}
        assert rec["prompt_token_ids"] == out.prompt_token_ids
        assert rec["token_ids"] == out.outputs[0].token_ids
        assert rec["text"] == out.outputs[0].text
        assert rec["finish_reason"] == "length"


def test_invalid_sampling_flag_exits_2_with_a_clear_message():
    proc = run("generate", "--load-format", "dummy", "--preset", "tiny-llama", "--temperature", "-1", "hi")
    assert proc.returncode == 2
    assert "temperature must be >= 0" in proc.stderr


def test_unknown_model_path_exits_2_naming_it(tmp_path):
    proc = run("generate", "--model", str(tmp_path / "nope"), "hi")
    assert proc.returncode == 2
    assert f"model path does not exist: {tmp_path / 'nope'}" in proc.stderr


def test_bench_offline_prints_a_table_and_a_json_last_line():
    proc = run("bench", "offline", "--load-format", "dummy", "--preset", "tiny-llama", "--num-prompts", "4",
               "--min-input", "8", "--max-input", "16", "--min-output", "5", "--max-output", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    *table, last = proc.stdout.strip().splitlines()
    result = json.loads(last)
    assert result["output_tokens"] == 20
    assert result["output_tokens_per_s"] == pytest.approx(20 / result["elapsed_s"], rel=0.01)
    assert any(line.strip().startswith("pdserve") for line in table)
