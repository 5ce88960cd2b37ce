"""A parallel rank other than 0: its part of the model and of the KV pool, and a loop
that does what rank 0 rings for (plan.py) until rank 0's pipe ends.

    python -m services.engine.parallel.follower --rank R --store PATH --config JSON --source FILE

Started by rank 0 (driver.py), never by hand. It dies with rank 0: at the pipe's end of
stream, at a collective that fails or times out, and by PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch

from services.engine import loader
from services.engine.attention import AttentionContext, get_backend
from services.engine.config import EngineConfig, EngineLayout
from services.engine.engine import _load_model
from services.engine.kv_sizing import num_kv_blocks
from services.engine.layers import linear
from services.engine.model_runner import kv_pool
from services.engine.models import ModelConfig
from services.engine.parallel import plan
from services.engine.parallel.driver import agree_num_blocks, own_part
from services.engine.parallel.group import Layout, Ranks
from services.engine.parallel.pipe import Pipe

log = logging.getLogger("pdserve.engine")


class Follower:
    def __init__(self, config: EngineConfig, rank: int, store_path: str, source: loader.ModelSource) -> None:
        device = config.resolve_device()
        if device.type == "cuda":
            device = torch.device("cuda", (device.index or 0) + rank)  # rank 0 has the first
            torch.cuda.set_device(device)
        dtype = config.resolve_dtype(device)
        config = dataclasses.replace(config, max_num_batched_tokens=config.resolve_step_tokens(device))
        self.layout = Layout(config.tensor_parallel_size, config.pipeline_parallel_size, rank)
        ranks = Ranks.join(store_path, self.layout, device)
        self.group = ranks.world
        pipe = Pipe(ranks.world, self.layout) if self.layout.pp > 1 else None
        self.first_stage = pipe is None or pipe.first  # holds the LM head: joins the logits' all-gather
        self.cfg = ModelConfig.from_hf(source.hf_config)
        self.model = _load_model(self.cfg, source, device, dtype, config.max_model_len, ranks.tp, pipe)
        self.local = self.model.local
        self.backend = get_backend(config.attention_backend, device)
        blocks = num_kv_blocks(config, self.local, self.model, self.backend, device, dtype, config.max_model_len)
        layout = EngineLayout(device=device, dtype=dtype, num_kv_blocks=agree_num_blocks(self.group, blocks),
                              block_size=config.block_size, max_model_len=config.max_model_len,
                              vocab_size=self.cfg.vocab_size, eos_token_ids=(), model_identity=source.identity,
                              kv_dtype=dtype)  # rank 0 refuses other KV dtypes with several ranks
        if device.type == "cpu":
            linear.choose_cpu_orientation([m.weight for m in self.model.modules() if isinstance(m, torch.nn.Linear)])
        self.kv_cache = kv_pool(self.local, layout)
        self.kv_caches = [(layer[0], layer[1]) for layer in self.kv_cache]
        self.device = device

    @torch.inference_mode()
    def run(self, pipe) -> None:
        """Until end of stream: one header, then that op's collectives, as rank 0 does them."""
        ops = {plan.STEP: self._step, plan.COPY: self._copy, plan.READ: self._read, plan.WRITE: self._write}
        while len(raw := pipe.read(plan.HEADER.size)) == plan.HEADER.size:
            op, *fields = plan.HEADER.unpack(raw)
            ops[op](fields)

    def _step(self, fields: list[int]) -> None:
        payload = self.group.broadcast(torch.empty(fields[7], dtype=torch.int64, device=self.device))
        s = plan.unpack_step(fields, payload, self.local.num_kv_heads)
        hidden = self.model(s.input_ids, s.positions, AttentionContext(self.backend, self.kv_caches, s.meta))
        if not self.first_stage:
            return
        self.model.compute_logits(hidden[s.logits_indices])  # the all-gather of rank 0's sampling rows
        if s.prompt_rows.numel():
            self.model.compute_logits(hidden[s.prompt_rows])

    def _copy(self, fields: list[int]) -> None:
        n = fields[0]
        both = self.group.broadcast(torch.empty(2 * n, dtype=torch.int64, device=self.device))
        self.kv_cache[:, :, both[n:]] = self.kv_cache[:, :, both[:n]]

    def _read(self, fields: list[int]) -> None:
        block_id, tokens = fields[:2]
        self.group.all_gather(self.kv_cache[:, :, block_id, :tokens])

    def _write(self, fields: list[int]) -> None:
        block_id, tokens = fields[:2]
        c = self.cfg
        whole = torch.empty(c.num_layers, 2, tokens, c.num_kv_heads, c.head_dim, dtype=self.kv_cache.dtype,
                            device=self.device)
        self.group.broadcast(whole)
        self.kv_cache[:, :, block_id, :tokens] = own_part(whole, c, self.layout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.engine.parallel.follower")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--store", required=True, help="the FileStore rank 0 made for this engine")
    p.add_argument("--config", required=True, help="EngineConfig as JSON")
    p.add_argument("--source", required=True, help="a JSON file: the model source rank 0 resolved")
    args = p.parse_args(argv)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with rank 0
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s tp-rank-{args.rank} %(name)s: %(message)s")
    fields = json.loads(args.config)
    if fields.get("cache_dir") is not None:
        fields["cache_dir"] = Path(fields["cache_dir"])
    try:
        source = loader.source_from_json(Path(args.source).read_text())
        Follower(EngineConfig(**fields), args.rank, args.store, source).run(sys.stdin.buffer)
    except Exception:  # noqa: BLE001 - any failure ends this rank; rank 0's next collective fails
        log.exception("tensor-parallel rank %d failed", args.rank)
        return 1
    return 0


def exit_now(code: int) -> None:
    """Leave without the interpreter's teardown of torch and transformers (about 1.5 s a rank,
    paid each time an engine closes): once rank 0's pipe has ended this rank holds nothing to
    save, so after the log is flushed the OS reclaims the rest."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
