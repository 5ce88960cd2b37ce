"""The `pdserve` console script as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import re
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
    assert "temperature must be finite and >= 0" in proc.stderr


def test_generate_with_a_regex_constrains_the_output():
    proc = run("generate", "--load-format", "dummy", "--preset", "tiny-llama", "--json", "--temperature", "1",
               "--seed", "3", "--regex", "[a-c]{2}-[0-9]", "hi")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert re.fullmatch("[a-c]{2}-[0-9]", record["text"]) and record["finish_reason"] == "stop"


def test_generate_with_an_invalid_grammar_exits_2_with_xgrammars_reason():
    proc = run("generate", "--load-format", "dummy", "--preset", "tiny-llama", "--grammar", "root ::= nope", "hi")
    assert proc.returncode == 2
    assert 'invalid grammar: EBNF parser error at line 1, column 10: Rule "nope" is not defined' in proc.stderr


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


def test_router_imports_no_model_runner_or_kernel_code():
    code = (
        "import sys, router.main, router.server, router.policy, router.registry, router.routing, router.http\n"
        "bad = [m for m in sys.modules if m.startswith(('services.engine.model', 'services.engine.engine',"
        " 'services.engine.attention', 'services.engine.sampler', 'kernels', 'services.kv'))]\n"
        "assert not bad, bad\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_serve_and_generate_url_with_the_default_model(tmp_path, default_llm):
    """`pdserve serve` on the default model; a ~200-token prompt is prefilled remotely and its
    tokens equal the in-process engine's."""
    from services.cli.stack import free_port
    from services.engine import SamplingParams

    port, http = free_port(), free_port()
    serve = subprocess.Popen([*PDSERVE, "serve", "--port", str(port), "--http-port", str(http), "--max-model-len", "1024"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if line.startswith("try: pdserve generate"):
                break
        assert any(f"127.0.0.1:{port}" in line for line in lines), "".join(lines)
        prompt = "Summarize the history of computing in one paragraph. " * 20
        proc = run("generate", "--url", f"127.0.0.1:{port}", "--json", "--max-tokens", "8", prompt, "What is AI?")
        assert proc.returncode == 0, proc.stderr
        long_rec, short_rec = (json.loads(line) for line in proc.stdout.splitlines())
        expected = default_llm.generate([prompt, "What is AI?"], SamplingParams(temperature=0, max_tokens=8))
        assert [long_rec["token_ids"], short_rec["token_ids"]] == [o.outputs[0].token_ids for o in expected]
        n = long_rec["usage"]["prompt_tokens"]
        assert 150 < n < 250
        d = long_rec["disaggregation"]
        assert d["remote_prefill"] and d["decode_computed_prompt_tokens"] == 0
        assert d["kv_blocks_shipped"] == -(-n // 16) and d["kv_bytes_shipped"] == n * 30 * 2 * 3 * 64 * 4
        assert not short_rec["disaggregation"]["remote_prefill"]
    finally:
        serve.send_signal(subprocess.signal.SIGINT)
        assert serve.wait(60) == 0


def test_benchmark_scripts_run_and_print_their_tables(tmp_path):
    """The CPU benchmark scripts, tiny settings: they run, print and record their tables."""
    kv = subprocess.run([sys.executable, "loadtest/bench_kv_transfer.py", "--tokens", "40", "--requests", "1"],
                        capture_output=True, text=True, timeout=300)
    assert kv.returncode == 0, kv.stderr
    rows = [line for line in kv.stdout.splitlines() if line.startswith("| ") and "GB/s" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"]
    report = tmp_path / "B.md"
    report.write_text("# Benchmarks\n")
    disagg = subprocess.run(
        [sys.executable, "loadtest/bench_disagg_cpu.py", "--duration", "2", "--clients", "2", "--long", "80",
         "--short", "8", "--output", "4", "--model-args", "--load-format dummy --preset tiny-llama --max-model-len 256",
         "--log-dir", str(tmp_path), "--write", str(report)],
        capture_output=True, text=True, timeout=300)
    assert disagg.returncode == 0, disagg.stderr
    text = report.read_text()
    assert "| colocated | 2 |" in text and "| disaggregated | 1 |" in text and "bench_disagg_cpu:end" in text


def test_serve_benchmark_script_records_both_stacks_and_its_plots(tmp_path):
    """loadtest/bench_serve_disagg_cpu.py, tiny settings: both stacks at two rates, one section, three PNGs."""
    report = tmp_path / "B.md"
    report.write_text("# Benchmarks\n")
    proc = subprocess.run(
        [sys.executable, "loadtest/bench_serve_disagg_cpu.py", "--rates", "2,4", "--duration", "2", "--long", "80",
         "--short", "8", "--output", "4", "--model-args", "--load-format dummy --preset tiny-llama --max-model-len 256",
         "--log-dir", str(tmp_path), "--write", str(report), "--plots", str(tmp_path / "docs")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report.read_text()
    for row in ("| colocated | 2 |", "| colocated | 4 |", "| disaggregated | 2 |", "| disaggregated | 4 |"):
        assert row in text
    assert text.count("bench_serve_disagg_cpu:end") == 1
    for name in ("latency_cdf", "throughput_vs_rate", "latency_vs_rate"):
        assert f"](docs/bench_serve_disagg_cpu_{name}.png)" in text
        assert (tmp_path / "docs" / f"bench_serve_disagg_cpu_{name}.png").stat().st_size > 0
