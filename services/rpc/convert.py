"""Between protobuf messages and engine types. Torch-free: the router uses it too."""

from __future__ import annotations

from google.protobuf.message import Message

from pdserve.v1 import common_pb2
from services.engine.errors import InvalidRequestError
from services.engine.outputs import CompletionOutput, Logprob, SampledToken
from services.engine.sampling_params import SamplingParams, StructuredOutputParams

# proto field -> SamplingParams field, for the optional scalars copied when present.
_SCALARS = (
    "n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "min_tokens", "ignore_eos", "logprobs",
    "include_stop_str_in_output", "skip_special_tokens", "cache_salt", "prompt_logprobs", "speculative",
)


def reject_unknown_fields(msg: Message) -> None:
    """A field this server does not know (a newer client, a typo'd schema) is an error, not silently dropped."""
    from google.protobuf import unknown_fields

    if len(unknown_fields.UnknownFieldSet(msg)):
        raise InvalidRequestError(f"{type(msg).__name__} has fields this server does not know")
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:  # a map: only message values can hide fields
            if field.message_type.fields_by_name["value"].message_type is not None:
                for item in value.values():
                    reject_unknown_fields(item)
            continue
        if field.is_repeated:
            for item in value:
                reject_unknown_fields(item)
        else:
            reject_unknown_fields(value)


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Engine sampling params from the wire; unset fields take the engine defaults."""
    kwargs = {name: getattr(msg, name) for name in _SCALARS if msg.HasField(name)}
    structured = structured_output_from_proto(msg.structured_output) if msg.HasField("structured_output") else None
    return SamplingParams(stop=tuple(msg.stop), stop_token_ids=tuple(msg.stop_token_ids),
                          logit_bias=dict(msg.logit_bias), structured_output=structured,
                          allowed_token_ids=tuple(msg.allowed_token_ids) or None, bad_words=tuple(msg.bad_words),
                          **kwargs)


def params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(stop=list(params.stop), stop_token_ids=list(params.stop_token_ids),
                                    logit_bias=dict(params.logit_bias), allowed_token_ids=params.allowed_token_ids or (),
                                    bad_words=list(params.bad_words))
    defaults = SamplingParams()
    for name in _SCALARS:
        value = getattr(params, name)
        if value is not None and value != getattr(defaults, name):
            setattr(msg, name, value)
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_output_to_proto(params.structured_output))
    return msg


def structured_output_from_proto(msg: common_pb2.StructuredOutput) -> StructuredOutputParams:
    kind = msg.WhichOneof("constraint")
    if kind is None:
        raise InvalidRequestError("structured_output sets no constraint")
    if kind == "choice":
        return StructuredOutputParams(choice=tuple(msg.choice.choices))
    return StructuredOutputParams(**{kind: getattr(msg, kind)})


def structured_output_to_proto(so: StructuredOutputParams) -> common_pb2.StructuredOutput:
    kind, _ = so.key
    if kind == "choice":
        return common_pb2.StructuredOutput(choice=common_pb2.Choices(choices=list(so.choice)))
    return common_pb2.StructuredOutput(**{kind: getattr(so, kind)})


def logprobs_to_proto(position: dict[int, Logprob]) -> common_pb2.PositionLogprobs:
    return common_pb2.PositionLogprobs(
        entries=[common_pb2.TokenLogprob(token_id=t, logprob=lp.logprob, rank=lp.rank) for t, lp in position.items()]
    )


def prompt_logprobs_to_proto(entries: list[dict[int, Logprob] | None]) -> list[common_pb2.PositionLogprobs]:
    """One PositionLogprobs per prompt token; empty where there is none (the first)."""
    return [common_pb2.PositionLogprobs() if e is None else logprobs_to_proto(e) for e in entries]


def logprobs_from_proto(msg: common_pb2.PositionLogprobs) -> dict[int, Logprob]:
    return {e.token_id: Logprob(e.logprob, e.rank) for e in msg.entries}


def prompt_logprobs_from_proto(entries) -> list[dict[int, Logprob] | None] | None:
    """prompt_logprobs_to_proto's inverse (an empty entry: None); None when there are none."""
    return [logprobs_from_proto(p) if p.entries else None for p in entries] or None


def delta_to_proto(c: CompletionOutput) -> common_pb2.CompletionDelta:
    return common_pb2.CompletionDelta(
        index=c.index,
        token_ids=c.token_ids,
        text=c.text,
        finish_reason=c.finish_reason or "",
        stop_reason="" if c.stop_reason is None else str(c.stop_reason),
        logprobs=[logprobs_to_proto(p) for p in c.logprobs or []],
    )


def sampled_token(token_id: int, logprobs: common_pb2.PositionLogprobs | None) -> SampledToken:
    return SampledToken(token_id, logprobs_from_proto(logprobs) if logprobs is not None and logprobs.entries else None)
