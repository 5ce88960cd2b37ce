"""Rank 0's side of a parallel engine: it starts the other ranks, and each time its
model runner steps, copies, reads or writes KV it has them do the same (plan.py)."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from services.engine.config import EngineConfig
from services.engine.errors import PdserveError
from services.engine.loader import ModelSource, source_to_json
from services.engine.models.config import ModelConfig
from services.engine.parallel import plan
from services.engine.parallel.group import Layout, Ranks, Group
from services.engine.parallel.pipe import stage_layers
from services.engine.parallel.shard import Shard

_STOP_WAIT_S = 10.0


def cpu_threads_per_rank(size: int) -> int:
    """Each CPU rank's share of this process's threads (at least one)."""
    return max(torch.get_num_threads() // size, 1)


class RankDiedError(PdserveError):
    """Another rank of this engine is gone: the engine cannot step any more."""


class Followers:
    """Ranks 1..N-1 as child processes (python -m services.engine.parallel.follower), each
    holding the read end of a pipe from here."""

    def __init__(self, config: EngineConfig, max_model_len: int, source: ModelSource) -> None:
        self.size = config.tensor_parallel_size * config.pipeline_parallel_size
        # The source as rank 0 resolved it: each follower starts from it instead of resolving
        # the model again. A file, as a real model's parameter list may not fit an argument.
        source_json = source_to_json(source)
        self._dir = Path(tempfile.mkdtemp(prefix="pdserve-tp-"))  # mode 0700: only this user's ranks join
        self.store_path = str(self._dir / "store")
        source_path = self._dir / "source.json"
        source_path.write_text(source_json)
        fields = dataclasses.asdict(config) | {"max_model_len": max_model_len, "speculative_config": None}
        fields["cache_dir"] = str(config.cache_dir) if config.cache_dir is not None else None
        env = dict(os.environ)
        if config.resolve_device().type == "cpu":  # the ranks share the cores instead of each taking all
            env["OMP_NUM_THREADS"] = str(cpu_threads_per_rank(self.size))
        self._closing = False
        self.procs = [
            subprocess.Popen([sys.executable, "-m", "services.engine.parallel.follower", "--rank", str(rank),
                              "--store", self.store_path, "--config", json.dumps(fields),
                              "--source", str(source_path)],
                             stdin=subprocess.PIPE, env=env)
            for rank in range(1, self.size)
        ]
        atexit.register(self.close)  # an engine nobody closes (pdserve generate, bench) still cleans up

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Call `on_death(why)` from a watcher thread if a rank exits before `close`: an idle
        engine learns of it at once instead of at its next step."""
        def wait(rank: int, proc: subprocess.Popen) -> None:
            code = proc.wait()
            if not self._closing:
                on_death(f"parallel rank {rank} exited with code {code}")

        for rank, proc in enumerate(self.procs, start=1):
            threading.Thread(target=wait, args=(rank, proc), name=f"pdserve-rank-{rank}-watch", daemon=True).start()

    def ring(self, op: int, *fields: int) -> None:
        """Tell every follower what comes next."""
        header = plan.HEADER.pack(op, *fields, *[0] * (plan.HEADER.size // 8 - 1 - len(fields)))
        for rank, proc in enumerate(self.procs, start=1):
            try:
                proc.stdin.write(header)
                proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                raise RankDiedError(f"tensor-parallel rank {rank} is gone (exit code {proc.poll()})") from None

    def close(self) -> None:
        """End of stream on every pipe: followers exit; any still there after a while is killed."""
        self._closing = True
        for proc in self.procs:
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
        for proc in self.procs:
            try:
                proc.wait(_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class ParallelDriver:
    """What the model runner of rank 0 calls so the other ranks run the same step."""

    def __init__(self, followers: Followers, ranks: Ranks, cfg: ModelConfig) -> None:
        self.followers, self.group, self.cfg, self.layout = followers, ranks.world, cfg, ranks.layout

    def step(self, input_ids, positions, meta, logits_indices, prompt_rows: list[int]) -> None:
        fields, payload = plan.pack_step(input_ids, positions, meta, logits_indices, prompt_rows)
        self.followers.ring(plan.STEP, *fields)
        self.group.broadcast(payload)

    def copy_blocks(self, copies: list[tuple[int, int]], device: torch.device) -> None:
        self.followers.ring(plan.COPY, len(copies))
        self.group.broadcast(torch.tensor([s for s, _ in copies] + [d for _, d in copies], device=device))

    def read_block(self, kv_cache: torch.Tensor, block_id: int, num_tokens: int) -> torch.Tensor:
        """One block's first `num_tokens` slots with every KV head: [layers, 2, tokens, kv_heads, dim]."""
        self.followers.ring(plan.READ, block_id, num_tokens)
        parts = self.group.all_gather(kv_cache[:, :, block_id, :num_tokens])
        return whole_block(parts, self.cfg, self.layout)

    def write_block(self, kv_cache: torch.Tensor, block_id: int, data: torch.Tensor) -> None:
        """Fill one block from `data` (every KV head); each rank keeps its own heads."""
        self.followers.ring(plan.WRITE, block_id, data.shape[2])
        whole = self.group.broadcast(data.to(kv_cache.device, kv_cache.dtype).contiguous())
        kv_cache[:, :, block_id, : data.shape[2]] = own_part(whole, self.cfg, self.layout)

    def agree_num_blocks(self, num_blocks: int) -> int:
        return agree_num_blocks(self.group, num_blocks)

    def close(self) -> None:
        self.followers.close()


def agree_num_blocks(group: Group, num_blocks: int) -> int:
    """The fewest KV blocks any rank has room for: the pool size of every rank."""
    counts = group.all_gather(torch.tensor([num_blocks], dtype=torch.int64, device=group.device))
    return int(min(c.item() for c in counts))


def own_part(whole: torch.Tensor, cfg: ModelConfig, layout: Layout) -> torch.Tensor:
    """A rank's layers and KV heads of a whole block [layers, 2, tokens, kv_heads, dim]."""
    layers = stage_layers(cfg.num_layers, layout)
    heads = Shard(layout.tp_rank, layout.tp).kv_heads(cfg) if layout.tp > 1 else range(cfg.num_kv_heads)
    return whole[layers.start : layers.stop, :, :, heads.start : heads.stop]


def whole_block(parts: list[torch.Tensor], cfg: ModelConfig, layout: Layout) -> torch.Tensor:
    """The inverse of `own_part` over every rank's part (in world rank order): each stage's
    distinct head shards side by side, the stages' layers one after another."""
    owners = Shard(0, layout.tp).kv_owners(cfg) if layout.tp > 1 else [0]
    stages = [torch.cat([parts[stage * layout.tp + r] for r in owners], dim=3) for stage in range(layout.pp)]
    return torch.cat(stages, dim=0)
