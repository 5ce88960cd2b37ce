"""The front's side of the engine core's outputs (core_client.py): each request's stream, and a
CoreOutputs message's deltas turned into RequestOutputs, text assembled by text.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.v1 import engine_pb2
from services.engine.async_engine import OutputQueue
from services.engine.core_channel import block_from_proto
from services.engine.kv_transfer import KVImport
from services.engine.outputs import Logprob, RequestOutput
from services.engine.sampling_params import SamplingParams
from services.engine.text import SequenceText
from services.engine.tokenizer import Tokenizer
from services.kv.nixl_core import ref_from_proto
from services.rpc.convert import logprobs_from_proto, prompt_logprobs_from_proto

# What the core said of one sequence: (index, new tokens, their logprobs, finish reason, stop token).
SeqNews = tuple[int, list[int], list[dict[int, Logprob]] | None, str | None, int | None]
StopSequence = Callable[[str, int], None]  # tells the core a stop string ended (request id, sequence)


@dataclass
class Stream:
    """One request as the front sees it: where its outputs go, and its text."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: OutputQueue
    prompt_token_ids: list[int]
    params: SamplingParams
    tokenizer: Tokenizer | None  # None: no text (no tokenizer, detokenize off, or a prefill-only request)
    num_seqs: int  # params.n, or the sequences a migrated request resumes here
    seqs: dict[int, SequenceText] = field(default_factory=dict)
    finished: bool = False
    num_cached_tokens: int = 0  # the core's last word on these (full deltas carry them)
    kv_import: KVImport | None = None

    def text_of(self, index: int) -> SequenceText:
        seq = self.seqs.get(index)
        if seq is None:
            detokenizer = (self.tokenizer.detokenizer(self.prompt_token_ids, self.params.skip_special_tokens)
                           if self.tokenizer is not None else None)
            seq = self.seqs[index] = SequenceText(index, self.params, detokenizer)
        return seq


def plain_news(columns: engine_pb2.CoreTokens, by_handle: dict[int, Stream]) -> list[tuple[Stream, list[SeqNews]]]:
    """The columns' entries (CoreTokens), by stream."""
    token_ids = list(columns.token_ids)
    by_stream: dict[int, tuple[Stream, list[SeqNews]]] = {}
    start = 0
    for handle, index, count in zip(columns.handles, columns.seq_index, columns.counts):
        stream = by_handle.get(handle)
        if stream is not None:
            by_stream.setdefault(handle, (stream, []))[1].append((index, token_ids[start:start + count], None,
                                                                   None, None))
        start += count
    return list(by_stream.values())


def full_output(delta: engine_pb2.CoreRequestDelta, stream: Stream, stop: StopSequence) -> RequestOutput:
    """A full delta's output: sequences, finishes, KV blocks and facts."""
    logprobs = stream.params.logprobs is not None
    seqs = [(d.index, list(d.token_ids), [logprobs_from_proto(p) for p in d.logprobs] if logprobs else None,
             d.finish_reason or None, d.stop_token_id if d.HasField("stop_token_id") else None)
            for d in delta.seqs]
    stream.num_cached_tokens = delta.num_cached_tokens
    if delta.HasField("kv_import"):
        stream.kv_import = _kv_import(delta.kv_import)
    output = stream_output(stream, seqs, delta.finished, stop)
    output.kv_blocks = [block_from_proto(b) for b in delta.kv_blocks] + [ref_from_proto(r) for r in delta.kv_refs]
    if delta.HasField("kv_pull_from_block"):
        output.kv_pull_from_block = delta.kv_pull_from_block
    if delta.prompt_logprobs:  # the first prompt token has none: nothing predicts it
        output.prompt_logprobs = prompt_logprobs_from_proto(delta.prompt_logprobs)
    if delta.HasField("arrival_time"):
        output.times = (delta.arrival_time,
                        delta.scheduled_time if delta.HasField("scheduled_time") else None,
                        delta.first_token_time if delta.HasField("first_token_time") else None)
    return output


def stream_output(stream: Stream, seqs: list[SeqNews], core_finished: bool, stop: StopSequence) -> RequestOutput:
    """The stream's next output from the core's news of its sequences: text assembled, stop
    strings applied (`stop` tells the core what they ended)."""
    outputs = []
    for index, token_ids, logprobs, finish_reason, stop_token in seqs:
        seq = stream.text_of(index)
        was_finished = seq.finished
        out = seq.feed(token_ids, logprobs, finish_reason, stop_token)
        if out is not None:
            outputs.append(out)
        if seq.stopped_here and not was_finished and not core_finished:
            stop(stream.request_id, index)
    finished = core_finished or (len(stream.seqs) == stream.num_seqs and all(s.finished for s in stream.seqs.values()))
    stream.finished = finished
    return RequestOutput(request_id=stream.request_id, prompt_token_ids=stream.prompt_token_ids, outputs=outputs,
                         finished=finished, num_cached_tokens=stream.num_cached_tokens, kv_import=stream.kv_import)


def _kv_import(msg: engine_pb2.CoreKVImport) -> KVImport:
    imp = KVImport(state=msg.state, num_cached_blocks=msg.num_cached_blocks, num_prompt_blocks=msg.num_prompt_blocks,
                   bytes_received=msg.bytes_received, prefill_cached_tokens=msg.prefill_cached_tokens,
                   computed_locally=msg.computed_locally, allocated_at=msg.allocated_at, failure=msg.failure or None)
    if msg.HasField("completed_at"):
        imp.completed_at = msg.completed_at
    return imp
