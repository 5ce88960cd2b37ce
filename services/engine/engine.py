"""EngineCore: one model, one KV pool, one scheduler; the step loop and the stop rules.

    plan = scheduler.schedule()          # who computes which tokens (plain Python)
    step = runner.execute(plan)          # tensors, forward, sampling: queued on the device
    scheduler.advance(plan)              # computed tokens; placeholders for tokens being sampled
    scheduler.update(plan, step.result(), ...)  # read back: tokens, stop checks, free blocks

Async scheduling (on by default on CUDA) reads step N back only after step N+1 is planned
and queued, so the host's Python overlaps the GPU's work instead of leaving it idle:

    step N+1:  schedule -> execute -> read back N, update -> advance
    device:    [ ...... N ...... ][ ....... N+1 ....... ]

Step N+1 decodes N's tokens straight from the device (PENDING_TOKEN placeholders). Stop rules
run when a token is read back, one step late: a sequence that stopped at step N has computed
one token more in N+1, which is dropped with its blocks (the device runs steps in order, so
nothing reuses those blocks before N+1 is done). A step whose tokens the host must see before
planning the next one (SampleSpec.sync: forks, grammars, KV export) is
read back at once, so those requests behave exactly as without async scheduling.

Not thread-safe: `LLM` drives it directly, `AsyncEngine` from its own engine thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from services.engine import loader
from services.engine.attention import get_backend
from services.engine.block_manager import BlockManager
from services.engine.config import EngineConfig, EngineLayout
from services.engine.errors import ConfigError, InvalidRequestError
from services.engine.host_memory import keep_freed_memory
from services.engine.kv_sizing import bytes_per_block, num_kv_blocks
from services.engine.kv_transfer import (BlockData, BlockRef, KVExport, KVImport, KVTransferError, LayerwiseBlock,
                                         check_block)
from services.engine.layers.linear import deferred_weights
from services.engine.model_runner import LaunchedStep, ModelRunner, kv_pool
from services.engine.models import ModelConfig, build_model
from services.engine.outputs import Logprob, SampledToken
from services.engine.parallel.driver import Followers, ParallelDriver, agree_num_blocks, cpu_threads_per_rank
from services.engine.parallel.group import Layout, Ranks, Group
from services.engine.parallel.pipe import Pipe, stage_layers
from services.engine.parallel.shard import Shard
from services.engine.quant import QuantizedWeight, quantizer
from services.engine.sampler import Sampler
from services.engine.sampling_params import SamplingParams
from services.engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from services.engine.sequence import Request, Resumed, Sequence
from services.engine.spec.draft import DraftProposer, EarlyExit
from services.engine.spec.ngram import NgramProposer
from services.engine.spec.speculator import Speculator
from services.engine.structured_output import GrammarCompiler
from services.engine.text import find_stop_string
from services.engine.tokenizer import Tokenizer

log = logging.getLogger("pdserve.engine")

Prompt = str | list[int]


class EngineCore:
    def __init__(self, config: EngineConfig, assemble_text: bool = True) -> None:
        """`assemble_text=False` (the engine-core process): no detokenizing and no stop strings
        here; the front does both (services/engine/text.py) and stops what it must."""
        t0 = time.perf_counter()
        device = config.resolve_device()
        config = dataclasses.replace(config, max_num_batched_tokens=config.resolve_step_tokens(device))
        self.config = config
        self.assemble_text = assemble_text
        dtype = config.resolve_dtype(device)
        source = loader.resolve(
            config.model, config.load_format, config.preset, config.dummy_seed, config.tokenizer, config.cache_dir,
            gguf_native=config.resolve_gguf_native(device),
        )
        if source.gguf_file is not None and config.quantization is not None:
            raise ConfigError(f"{source.gguf_file.name} is quantized already: --quantization applies to dense "
                              "checkpoints (or pass --gguf-weights converted to requantize its dequantized weights)")
        if source.quantization is not None and config.quantization not in (None, source.quantization):
            raise ConfigError(f"the checkpoint is {source.quantization} already; --quantization "
                              f"{config.quantization} does not apply")
        cfg = self.model_config = ModelConfig.from_hf(source.hf_config)
        self.model_name = source.name  # what clients call it unless the server is told otherwise
        self.tokenizer = Tokenizer.load(source.tokenizer_dir) if source.tokenizer_dir else None
        if device.type == "cpu":
            keep_freed_memory()  # every step's large tensors would otherwise start as fresh pages
        max_model_len = config.max_model_len or cfg.max_context
        if max_model_len > cfg.max_context:
            raise ConfigError(f"max_model_len {max_model_len} exceeds the model's context of {cfg.max_context} tokens")
        self._followers: Followers | None = None
        try:
            self._build(config, cfg, source, device, dtype, max_model_len)
        except BaseException:
            self.close()
            raise
        self.speculator = (self._speculator(config, self.runner.model, max_model_len, self._draft)
                           if config.speculative_config is not None else None)
        # A proposer needs every token on the host, so speculation runs synchronous steps.
        self.async_scheduling = (device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling) and self.speculator is None
        self._in_flight: tuple[StepPlan, LaunchedStep] | None = None  # launched, not read back
        self.requests: dict[str, Request] = {}
        self._exports: dict[str, Request] = {}  # prefill-only requests still shipping KV
        self._held: dict[str, list[int]] = {}  # request id -> slots named to a peer (by reference), until release_kv
        self.idle = True  # the last step scheduled nothing
        # Set (AsyncEngine, --kv-layerwise on): exported bytes go out layer by layer, mid-step,
        # through this (kv_transfer.py); called on the engine thread with the request.
        self.kv_layer_sink: Callable[[Request], None] | None = None
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        log.info(
            "engine ready in %.1fs: %s on %s/%s, %d KV blocks (%s) x %d tokens, max_model_len %d, TP %d x PP %d",
            time.perf_counter() - t0,
            self.layout.model_identity,
            self.layout.device,
            self.layout.dtype,
            self.layout.num_kv_blocks,
            self.layout.kv_dtype,
            config.block_size,
            self.layout.max_model_len,
            config.tensor_parallel_size,
            config.pipeline_parallel_size,
        )

    def _build(self, config: EngineConfig, cfg: ModelConfig, source: loader.ModelSource, device: torch.device,
               dtype: torch.dtype, max_model_len: int) -> None:
        """Model, KV pool, block manager, scheduler and runner; with tensor parallelism, first
        the other ranks (parallel/driver.py), which build their shards meanwhile."""
        ranks, pipe = None, None
        layout = Layout(config.tensor_parallel_size, config.pipeline_parallel_size, 0)
        if layout.tp * layout.pp > 1:
            if config.resolve_kv_dtype(dtype) == torch.float8_e4m3fn:
                raise ConfigError("an fp8 KV cache is not sharded across ranks yet: --kv-cache-dtype auto with "
                                  "--tensor-parallel-size/--pipeline-parallel-size > 1")
            if source.gguf_file is not None or source.quantization is not None or config.quantization is not None:
                raise ConfigError("quantized weights (a native GGUF file, an FP8 checkpoint, --quantization) are "
                                  "not sharded across ranks yet: use --gguf-weights converted and no "
                                  "--quantization with --tensor-parallel-size/--pipeline-parallel-size > 1")
            Shard(0, layout.tp).check(cfg)  # shapes that do not divide are refused before any rank starts
            stage_layers(cfg.num_layers, layout)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", 0)
            self._followers = Followers(config, max_model_len, source)
            if device.type == "cpu":
                torch.set_num_threads(cpu_threads_per_rank(self._followers.size))
            ranks = Ranks.join(self._followers.store_path, layout, device)
            pipe = Pipe(ranks.world, layout) if layout.pp > 1 else None
        model = _load_model(cfg, source, device, dtype, max_model_len, ranks.tp if ranks else None, pipe,
                            config.quantization)
        local = model.local
        backend = get_backend(config.attention_backend, device)
        # A draft model's weights load first and its KV (one block per target block) shares the
        # pool's budget, so the two pools together fit where the target's alone was sized.
        draft = self._draft = self._load_draft(config, cfg, device, dtype, max_model_len)
        kv_dtype = config.resolve_kv_dtype(dtype)
        draft_per_block = bytes_per_block(draft[0], config.block_size, kv_dtype) if draft is not None else 0
        num_blocks = num_kv_blocks(config, local, model, backend, device, kv_dtype, max_model_len, draft_per_block)
        if ranks is not None:
            num_blocks = agree_num_blocks(ranks.world, num_blocks)
        if num_blocks * config.block_size < max_model_len:
            raise ConfigError(
                f"the KV pool ({num_blocks} blocks of {config.block_size} tokens) cannot hold one request of "
                f"max_model_len={max_model_len} tokens: give the KV cache more memory or lower max_model_len"
            )
        self.layout = EngineLayout(
            device=device,
            dtype=dtype,
            kv_dtype=kv_dtype,
            num_kv_blocks=num_blocks,
            block_size=config.block_size,
            max_model_len=max_model_len,
            vocab_size=cfg.vocab_size,
            eos_token_ids=_eos_token_ids(source),
            model_identity=source.identity + (f"+{config.quantization}" if config.quantization else ""),
        )
        # Structured output needs the tokenizer's vocabulary; nothing is built until a request uses it.
        self.grammars = (GrammarCompiler.for_tokenizer(self.tokenizer.hf, cfg.vocab_size, self.layout.eos_token_ids)
                         if self.tokenizer is not None else None)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, max_model_len),
            self.block_manager,
            self._new_seq,
        )
        eager = config.enforce_eager or ranks is not None  # no CUDA graphs around collectives yet
        self.runner = ModelRunner(
            model,
            local,
            self.layout,
            backend,
            Sampler(self.layout.eos_token_ids, config.seed),
            cuda_graph_max_batch=0 if eager else min(config.max_num_seqs, 256),
            cuda_graph_max_prefill=0 if eager else min(config.max_num_batched_tokens, 512),
            max_rows=config.max_num_seqs,
            driver=ParallelDriver(self._followers, ranks, cfg) if ranks is not None else None,
        )

    def watch_ranks(self, on_death: Callable[[str], None]) -> None:
        """`on_death(why)` runs on a watcher thread if another parallel rank exits (none: never)."""
        if self._followers is not None:
            self._followers.watch(on_death)

    def close(self) -> None:
        """Stop the other parallel ranks (nothing to do without them)."""
        if self._followers is not None:
            self._followers.close()
            self._followers = None

    # ---- requests --------------------------------------------------------------------------

    def make_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        kv_export_from: int | None = None,
        remote_prefill: bool = False,
        kv_by_reference: bool = False,
        resume: list[Resumed] | None = None,
    ) -> Request:
        """Validate and tokenize a request without touching engine state (safe from any thread).

        `kv_export_from=k` makes a prefill-only request that ships its prompt's KV from block
        k on (prefill worker), as references into the pool with `kv_by_reference`;
        `remote_prefill` makes one whose prompt KV arrives from a peer (decode worker). See
        kv_transfer.py. `resume` continues sequences another worker began (migration): see
        `add`.
        """
        token_ids = self._tokenize(prompt)
        vocab = self.layout.vocab_size
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(token_ids) >= self.layout.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(token_ids)} tokens; this model's context is {self.layout.max_model_len} "
                "tokens, including at least one generated token"
            )
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})")
        if any(t >= vocab for t, _ in params.logit_bias):
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None and self.assemble_text:
            raise InvalidRequestError("stop strings need a tokenizer; this model has none")
        if params.allowed_token_ids is not None and params.allowed_token_ids[-1] >= vocab:
            raise InvalidRequestError(f"allowed_token_ids must be in [0, {vocab})")
        if params.bad_words and self.tokenizer is None:
            raise InvalidRequestError("bad_words need a tokenizer; this model has none")
        if not isinstance(priority, int):
            raise InvalidRequestError("priority must be an integer")
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            params=params,
            priority=priority,
            arrival_time=time.monotonic(),
        )
        if params.structured_output is not None:
            request.grammar = self.compile_grammar(params)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(token_ids)
        if params.bad_words:
            request.bad_words = tuple(ids for word in params.bad_words for ids in self.tokenizer.bad_word_ids(word))
        if kv_export_from is not None:
            if not 0 <= kv_export_from * self.config.block_size < len(token_ids):
                raise InvalidRequestError(f"cannot skip {kv_export_from} blocks of a {len(token_ids)}-token prompt")
            request.kv_export = KVExport(skip_blocks=kv_export_from, next_block=kv_export_from,
                                         by_reference=kv_by_reference)
        if remote_prefill:
            request.kv_import = KVImport()
        if resume:
            self._check_resume(request, resume)
            request.resume = resume
        return request

    def _check_resume(self, request: Request, resume: list[Resumed]) -> None:
        params, vocab = request.params, self.layout.vocab_size
        if request.kv_import is not None or request.kv_export is not None:
            raise InvalidRequestError("a resumed request prefills here: no KV transfer")
        if len({r.index for r in resume}) != len(resume) or any(not 0 <= r.index < params.n for r in resume):
            raise InvalidRequestError(f"resumed sequence indices must be distinct and in [0, {params.n})")
        for r in resume:
            if any(not 0 <= t < vocab for t in r.token_ids):
                raise InvalidRequestError(f"resumed token ids must be in [0, {vocab})")
            if len(r.token_ids) >= params.max_tokens or \
                    request.num_prompt_tokens + len(r.token_ids) >= self.layout.max_model_len:
                raise InvalidRequestError(f"resumed sequence {r.index} has no token left to generate")

    def compile_grammar(self, params: SamplingParams) -> object:
        """The compiled grammar of a structured-output request (cached; thread safe, so servers
        compile off their event loop first and `make_request` finds it cached)."""
        if self.grammars is None:
            raise InvalidRequestError("structured output needs a tokenizer; this model has none")
        return self.grammars.compile(params.structured_output)

    def add(self, request: Request) -> None:
        """Queue a request made by `make_request`. Sequence ids of a request are consecutive."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        request.arrival_order = next(self._arrivals)
        first = next(self._seq_ids)
        for _ in range(request.params.n - 1):
            next(self._seq_ids)  # reserved for the forked sequences
        if request.resume is not None:
            request.forked = True  # each sequence samples its own tokens from here
            request.seqs = [self._resumed_seq(request, first + r.index, r) for r in request.resume]
        else:
            request.seqs = [self._new_seq(request, first, 0)]
        self.requests[request.request_id] = request
        if request.kv_export is not None:
            self._exports[request.request_id] = request
        self.scheduler.add(request)

    def add_request(
        self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None, priority: int = 0
    ) -> Request:
        request = self.make_request(prompt, params or SamplingParams(), request_id, priority)
        self.add(request)
        return request

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.pop(request_id, None)
        self._exports.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request)
        return request

    def stop_sequence(self, request_id: str, index: int) -> Request | None:
        """Finish one sequence for a stop string the front found (text.py); its blocks go back
        to the pool. Returns the request if anything changed."""
        request = self.requests.get(request_id)
        seq = next((s for s in request.seqs if s.index == index), None) if request is not None else None
        if seq is None or seq.finished:
            return None
        self.scheduler.finish(seq, "stop")
        if request.finished:
            self.requests.pop(request_id, None)
            self._exports.pop(request_id, None)
        return request

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def has_step_in_flight(self) -> bool:
        """A step is launched and not read back (async scheduling)."""
        return self._in_flight is not None

    # ---- the loop --------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Run one step; returns the requests with something new: tokens, a finish, KV blocks
        to ship, or blocks allocated for a remote prefill."""
        plan = self.scheduler.schedule()
        self.runner.release(plan.released_seq_ids)
        if self.speculator is not None:
            self.speculator.release(plan.released_seq_ids)
            if not plan.is_empty:
                plan = self.speculator.speculate(plan, self.runner.copy_blocks)
        changed = {id(seq.request): seq.request for seq in self.scheduler.take_kv_pulls()}
        launched = self.runner.execute(plan, self._layerwise(plan)) if not plan.is_empty else None
        if self._in_flight is not None:  # the previous step, read back while this one runs
            self._read_back(*self._in_flight, changed)
            self._in_flight = None
        if launched is not None:
            self.scheduler.advance(plan)
            if self.async_scheduling and not any(s.sample is not None and s.sample.sync for s in plan.seqs):
                self._in_flight = (plan, launched)
            else:
                self._read_back(plan, launched, changed)
            for request in list(self._exports.values()):
                if self._export(request):
                    changed[id(request)] = request
        self.idle = plan.is_empty and self._in_flight is None
        for request in changed.values():
            if request.finished:
                self.requests.pop(request.request_id, None)
                self._exports.pop(request.request_id, None)
        return list(changed.values())

    def _read_back(self, plan: StepPlan, launched: LaunchedStep, changed: dict[int, Request]) -> None:
        for seq_id, (first, entries) in launched.prompt_logprobs().items():  # before update may end the request
            seq = self.scheduler.live(seq_id)
            if seq is not None:
                seq.request.prompt_logprobs[first : first + len(entries)] = entries
        sampled = launched.result()
        if self.speculator is not None:
            self.speculator.observe(plan, sampled)
        for request in self.scheduler.update(plan, sampled, self._on_token):
            changed[id(request)] = request

    def _on_token(self, seq: Sequence, sampled: SampledToken) -> None:
        """Record a sampled token's logprobs and text, and apply the stop rules."""
        params = seq.params
        token = sampled.token_id
        if params.logprobs is not None:
            seq.logprobs.append(sampled.logprobs)
        if seq.request.kv_export is not None:
            return  # prefill-only: the first token ends it once its KV is shipped (_export)
        text_before = 0
        if seq.detokenizer is not None:
            text_before = len(seq.text)
            seq.text += seq.detokenizer.step(token)
        if seq.grammar is not None:
            if not seq.grammar.accept(token):  # only a peer sampling under another grammar gets here
                log.warning("request %s: token %d breaks its grammar; aborting", seq.request.request_id, token)
                return self.scheduler.finish(seq, "abort")
            if seq.grammar.terminated:  # a complete match and a stop token: done, even under ignore_eos
                return self.scheduler.finish(seq, "stop")
        num_tokens = len(seq.token_ids)
        num_out = num_tokens - seq.num_prompt_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token in self.layout.eos_token_ids:
                return self.scheduler.finish(seq, "stop")
            if token in params.stop_token_ids:
                return self.scheduler.finish(seq, "stop", token)
            if params.stop and seq.detokenizer is not None and self._check_stop_strings(seq, text_before):
                return None
        if num_out >= params.max_tokens or num_tokens >= self.layout.max_model_len:
            self.scheduler.finish(seq, "length")

    def _check_stop_strings(self, seq: Sequence, text_before: int) -> bool:
        found = find_stop_string(seq.text, seq.params.stop, text_before)
        if found is None:
            return False
        at, stop = found
        seq.text = seq.text[: at + len(stop)] if seq.params.include_stop_str_in_output else seq.text[:at]
        self.scheduler.finish(seq, "stop", stop)
        return True

    # ---- KV transfer (kv_transfer.py) ----------------------------------------------------

    def _export(self, request: Request) -> bool:
        """Read newly computed prompt blocks out of the cache; end the request once its first
        token(s) are sampled and the partial last block is out. True if anything changed."""
        exp, seq, bs = request.kv_export, request.seqs[0], self.config.block_size
        num_prompt = request.num_prompt_tokens
        sampled = seq.num_output_tokens > 0
        end = -(-num_prompt // bs) if sampled else min(seq.num_computed_tokens, num_prompt) // bs
        hashes = self.block_manager.ensure_hashes(seq, num_prompt // bs)
        for i in range(exp.next_block, end):
            n = min(bs, num_prompt - i * bs)
            block_hash = hashes[i] if n == bs else None
            if exp.by_reference:  # held from now on: finish, abort or preemption leave the slot alone
                slot = seq.block_table[i]
                self.block_manager.hold([slot])
                self._held.setdefault(request.request_id, []).append(slot)
                exp.ready.append(BlockRef(i, block_hash, n, slot, self.runner.kv_scales))
            else:
                exp.ready.append(BlockData(i, block_hash, self.runner.read_block(seq.block_table[i], n),
                                           self.runner.kv_scales))
        exported = end > exp.next_block
        exp.next_block = max(exp.next_block, end)
        if exported and exp.by_reference:
            self.runner.synchronize()  # the step's KV writes are done before the peer reads them
        if sampled:
            for s in request.seqs:
                if not s.finished:
                    self.scheduler.finish(s, "prefilled")
        return exported or sampled

    def _layerwise(self, plan: StepPlan) -> Callable[[int], None] | None:
        """With a layer sink: the hook that ships, layer by layer, the blocks `plan` completes
        of each prompt exported as bytes (None when there are none). They are taken from
        `_export`'s share now (`next_block`), so nothing is shipped twice."""
        if self.kv_layer_sink is None or self.runner.driver is not None or plan.is_empty:
            return None
        bs, ships = self.config.block_size, []
        for s in plan.seqs:
            seq = self.scheduler.live(s.seq_id)
            request = seq.request if seq is not None else None
            exp = request.kv_export if request is not None else None
            if exp is None or exp.by_reference or seq is not request.seqs[0]:
                continue
            num_prompt, end_pos = request.num_prompt_tokens, s.start_pos + len(s.token_ids)
            end = -(-num_prompt // bs) if end_pos >= num_prompt else end_pos // bs
            if end <= exp.next_block:
                continue
            hashes = self.block_manager.ensure_hashes(seq, num_prompt // bs)
            blocks = []
            for i in range(exp.next_block, end):
                n = min(bs, num_prompt - i * bs)
                blocks.append(LayerwiseBlock(i, hashes[i] if n == bs else None, s.block_table[i], n))
            exp.next_block = end
            ships.append((request, blocks))
        return self._ship_layer(ships) if ships else None

    def _ship_layer(self, ships: list[tuple[Request, list[LayerwiseBlock]]]) -> Callable[[int], None]:
        runner, sink = self.runner, self.kv_layer_sink

        def after_layer(layer: int) -> None:
            scales = runner.kv_scales[layer : layer + 1] if runner.kv_scales is not None else None
            for request, blocks in ships:
                request.kv_export.ready.extend(
                    BlockData(b.block_index, b.block_hash, runner.read_layer(layer, b.slot, b.num_tokens), scales, layer)
                    for b in blocks)
                sink(request)

        return after_layer

    def release_kv(self, request_id: str) -> bool:
        """The peer has copied what it was shipped by reference: those blocks may be reused."""
        blocks = self._held.pop(request_id, None)
        if blocks is not None:
            self.block_manager.release(blocks)
        return blocks is not None

    def is_held(self, request_id: str) -> bool:
        """Whether `request_id`'s blocks wait for release_kv (read from any thread: a snapshot)."""
        return request_id in self._held

    @property
    def num_held_requests(self) -> int:
        return len(self._held)

    def receive_kv(self, request_id: str, block: BlockData) -> None:
        """Write one received block into the waiting request's cache slot (engine thread).

        A block that does not fit the request fails the transfer: the request prefills locally.
        """
        request = self.requests.get(request_id)
        if request is None or request.kv_import is None or request.kv_import.state != "waiting":
            return  # aborted, or already fell back to local prefill
        imp, seq = request.kv_import, request.seqs[0]
        bs = self.config.block_size
        i = block.block_index
        full = block.num_tokens == bs
        expected_hash = self.block_manager.ensure_hashes(seq, i + 1)[i] if full and i < seq.num_tokens // bs else None
        try:
            check_block(imp, block, request.num_prompt_tokens, bs, expected_hash)
            self.runner.write_block(seq.block_table[i], block.tensor, block.scales)
        except KVTransferError as e:
            self.fail_kv(request_id, str(e))
            return
        imp.received.add(i)
        imp.bytes_received += block.nbytes

    def finish_kv(self, request_id: str, first_tokens: list[SampledToken], prefill_cached_tokens: int,
                  prompt_logprobs: list[dict[int, Logprob] | None] | None = None) -> Request | None:
        """All blocks are in: the sequence(s) continue from the first token(s) prefill sampled
        (and, for a prompt_logprobs request, with the prompt's logprobs prefill computed)."""
        request = self.requests.get(request_id)
        if request is None or request.kv_import is None or request.kv_import.state != "waiting":
            return None
        imp = request.kv_import
        if not imp.complete:
            return self.fail_kv(request_id, f"{imp.num_expected_blocks - len(imp.received)} blocks missing")
        if len(first_tokens) != request.params.n or any(
            not 0 <= t.token_id < self.layout.vocab_size for t in first_tokens
        ):
            return self.fail_kv(request_id, "first tokens do not match the request")
        if request.prompt_logprobs is not None:
            if not self._valid_prompt_logprobs(request, prompt_logprobs):
                return self.fail_kv(request_id, "prompt_logprobs from prefill do not match the request")
            request.prompt_logprobs = list(prompt_logprobs)
        imp.state, imp.completed_at = "done", time.monotonic()
        imp.prefill_cached_tokens = prefill_cached_tokens
        self.scheduler.kv_arrived(request.seqs[0], first_tokens, self._on_token)
        if request.finished:  # the first token already ended it
            self.requests.pop(request_id, None)
        return request

    def fail_kv(self, request_id: str, reason: str) -> Request | None:
        """Give up on the transfer: keep the leading blocks that arrived, prefill the rest here."""
        request = self.requests.get(request_id)
        if request is None or request.kv_import is None or request.kv_import.state != "waiting":
            return None
        imp = request.kv_import
        imp.state, imp.failure, imp.completed_at = "failed", reason, time.monotonic()
        # At least the last prompt token is recomputed: its logits give the first output token.
        valid = min(imp.contiguous_received_blocks() * self.config.block_size, request.num_prompt_tokens - 1)
        if request.prompt_logprobs is not None:
            valid = 0  # the prompt's logprobs come with its logits: all of it is computed here
        imp.computed_locally = request.num_prompt_tokens - valid
        log.warning("request %s: KV transfer failed (%s); prefilling %d tokens locally",
                    request_id, reason, imp.computed_locally)
        self.scheduler.kv_failed(request.seqs[0], valid)
        return request

    def _valid_prompt_logprobs(self, request: Request, entries: list | None) -> bool:
        """One entry per prompt token, the first None, each naming its prompt token, ids in the vocabulary."""
        if entries is None or len(entries) != request.num_prompt_tokens or entries[0] is not None:
            return False
        vocab = self.layout.vocab_size
        return all(e is not None and token in e and all(0 <= t < vocab for t in e)
                   for token, e in zip(request.prompt_token_ids[1:], entries[1:], strict=True))

    # ---- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _load_draft(config: EngineConfig, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                    max_model_len: int) -> tuple[ModelConfig, torch.nn.Module, str] | None:
        """The draft_model method's model (its config, module and identity), checked against the
        target's; None for any other method."""
        spec = config.speculative_config
        if spec is None or spec.method != "draft_model":
            return None
        source = loader.resolve(spec.model, spec.load_format, spec.preset, spec.dummy_seed, None, config.cache_dir)
        draft_cfg = ModelConfig.from_hf(source.hf_config)
        if draft_cfg.vocab_size != cfg.vocab_size:
            raise ConfigError(f"the draft model's vocabulary ({draft_cfg.vocab_size}) is not the target's "
                              f"({cfg.vocab_size})")
        if draft_cfg.max_context < max_model_len:
            raise ConfigError(f"the draft model's context ({draft_cfg.max_context}) is below max_model_len")
        return draft_cfg, _load_model(draft_cfg, source, device, dtype, max_model_len), source.identity

    def _speculator(self, config: EngineConfig, model: torch.nn.Module, max_model_len: int,
                    draft: tuple[ModelConfig, torch.nn.Module, str] | None) -> Speculator:
        spec, cfg = config.speculative_config, self.model_config
        if spec.method == "ngram":
            proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
        elif spec.method == "self_spec":
            num_layers = spec.num_layers or max(1, cfg.num_layers // 4)
            if num_layers >= cfg.num_layers:
                raise ConfigError(f"self_spec num_layers must be below the model's {cfg.num_layers} layers")
            proposer = DraftProposer(self.runner, EarlyExit(model, num_layers), None)
        else:
            draft_cfg, draft_model, identity = draft
            proposer = DraftProposer(self.runner, draft_model, kv_pool(draft_cfg, self.layout))
            log.info("draft model %s: its own KV pool of %d blocks", identity, self.layout.num_kv_blocks)
        return Speculator(spec, proposer, self.scheduler, config.max_num_batched_tokens, max_model_len)

    def _new_seq(self, request: Request, seq_id: int, index: int) -> Sequence:
        seq = Sequence(seq_id=seq_id, index=index, request=request, token_ids=list(request.prompt_token_ids))
        if request.params.logprobs is not None:
            seq.logprobs = []
        if request.params.detokenize and self.tokenizer is not None and self.assemble_text:
            seq.detokenizer = self.tokenizer.detokenizer(request.prompt_token_ids, request.params.skip_special_tokens)
        if request.grammar is not None:
            seq.grammar = self.grammars.new_state(request.grammar)
        return seq

    def _resumed_seq(self, request: Request, seq_id: int, resumed: Resumed) -> Sequence:
        """A sequence that continues output streamed elsewhere: text, grammar and logprob
        positions advance through that output as if this engine had sampled it; it recomputes
        prompt and output (prefix-cache hits first) and samples at the next output position.
        Nothing of the resumed output is streamed again."""
        seq = self._new_seq(request, seq_id, resumed.index)
        seq.token_ids.extend(resumed.token_ids)
        for token in resumed.token_ids:
            if seq.logprobs is not None:
                seq.logprobs.append({})  # streamed already; never sent again
            if seq.detokenizer is not None:
                seq.text += seq.detokenizer.step(token)
            if seq.grammar is not None and not seq.grammar.accept(token):
                raise InvalidRequestError(f"resumed sequence {resumed.index} does not match its grammar")
        seq.num_emitted_tokens = len(resumed.token_ids)
        seq.num_emitted_chars = min(resumed.text_chars, len(seq.text))
        return seq

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: send token ids, or pass --tokenizer")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Seq):
            return list(prompt)
        raise InvalidRequestError(f"a prompt is a string or a list of token ids, got {type(prompt).__name__}")


def _eos_token_ids(source: loader.ModelSource) -> tuple[int, ...]:
    eos = source.hf_config.eos_token_id
    if source.weights_dir is not None and (source.weights_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(str(source.weights_dir)).eos_token_id or eos
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)


def _load_model(cfg: ModelConfig, source: loader.ModelSource, device: torch.device, dtype: torch.dtype,
                max_model_len: int, tp: Group | None = None, pipe: Pipe | None = None,
                quantization: str | None = None) -> torch.nn.Module:
    """The model with its weights, or this rank's part of them (`tp`: its shard; `pipe`: its
    stage). Quantized weights (a native GGUF file, an FP8 checkpoint, `quantization`) are
    installed one at a time into a model built without dense Linear weights, so a dense copy
    of the whole model never exists."""
    t0 = time.perf_counter()
    deferred = source.gguf_file is not None or source.quantization is not None or quantization is not None
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), (deferred_weights() if deferred else contextlib.nullcontext()):
            model = build_model(cfg, max_model_len, tp, pipe)
    finally:
        torch.set_default_dtype(previous)
    weights = loader.iter_weights(source)
    if deferred:
        weights = ((name, w.to(device) if isinstance(w, QuantizedWeight) else w.to(device, dtype))
                   for name, w in weights)
    # A pre-quantized checkpoint's dense Linears (those its quantization config ignores) stay dense.
    model.load_weights(weights, quantizer(quantization) if source.quantization is None else None)
    model.eval()
    log.info("loaded weights in %.1fs%s", time.perf_counter() - t0, f" ({quantization})" if quantization else "")
    return model
