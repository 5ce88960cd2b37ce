"""Workload generators shared by the locust file and `pdserve bench serve`, selected by name.

A workload is a frozen, validated dataclass of its parameters with one method,
`sample(rng) -> RequestSpec`; `specs(workload, seed)` turns it into a deterministic stream of
requests. Prompts are random token ids below `vocab_size` (exact lengths, no tokenizer
needed, nothing shared by accident) or, with `prompt_format="text"`, words from a fixed
list (about one token each for BPE tokenizers; the record keeps the real count from the
server's usage). The router accepts either.

    name            what                                              parameters (defaults)
    fixed           every request the same lengths                    input_len=128 output_len=32
    sharegpt-like   chat-like lengths: lognormal input and output,    input_median=128 input_sigma=1.0
                    clipped; medians/spreads are ours, chosen to       input_min=4 input_max=1024
                    resemble chat traffic (short prompts, answers of   output_median=96 output_sigma=0.7
                    similar length, long tails), NOT fitted to the     output_min=4 output_max=512
                    ShareGPT data set (not available offline)
    tenants         N tenants, each with its own shared prefix, plus  num_tenants=4 prefix_len=512
                    a unique suffix per request; tenant i drawn with   suffix_len=32 output_len=32
                    weight 1/(i+1)^tenant_skew (0 = uniform)           tenant_skew=0.0 prefix_seed=0
    long-short      long prompts mixed with short chats, to expose    long_len=1024 short_len=64
                    prefill-decode interference                       long_fraction=0.25
                                                                      long_output_len=32 short_output_len=32

Every workload also takes vocab_size=10000 and prompt_format=ids|text. Parameters come
from Python (`LongShort(long_len=512)`) or from strings (`make_workload("long-short",
parse_params("long_len=512,long_fraction=0.5"))`), which is how the CLI and locust pass them.
"""

from __future__ import annotations

import dataclasses
import math
import random
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

# Common English words; with a leading space each is a single token for GPT-2/Llama-style BPE.
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did"
).split()


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload: its prompt (token ids or text), how many tokens to ask
    for, and a kind label that results are broken down by ("long", "tenant-2", ...)."""

    kind: str
    max_tokens: int
    token_ids: tuple[int, ...] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if (self.token_ids is None) == (self.text is None):
            raise ValueError("a request has exactly one of token_ids and text")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def prompt_len(self) -> int | None:
        """Prompt tokens when known on the client (token-id prompts)."""
        return None if self.token_ids is None else len(self.token_ids)


@dataclass(frozen=True, kw_only=True)
class _Prompts:
    """What every workload shares: how prompt tokens are drawn and sent."""

    vocab_size: int = 10_000
    prompt_format: str = "ids"

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.prompt_format not in ("ids", "text"):
            raise ValueError(f"prompt_format must be 'ids' or 'text', got {self.prompt_format!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_len", "_min", "_max", "_median")) and value < 1:
                raise ValueError(f"{f.name} must be >= 1, got {value}")

    def tokens(self, rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(self.vocab_size) for _ in range(n)]

    def request(self, kind: str, tokens: list[int], max_tokens: int) -> RequestSpec:
        if self.prompt_format == "text":
            return RequestSpec(kind, max_tokens, text=" ".join(_WORDS[t % len(_WORDS)] for t in tokens))
        return RequestSpec(kind, max_tokens, token_ids=tuple(tokens))


@dataclass(frozen=True, kw_only=True)
class Fixed(_Prompts):
    """Every request has `input_len` random prompt tokens and asks for `output_len` tokens."""

    name: typing.ClassVar[str] = "fixed"
    input_len: int = 128
    output_len: int = 32

    def sample(self, rng: random.Random) -> RequestSpec:
        return self.request("fixed", self.tokens(rng, self.input_len), self.output_len)


@dataclass(frozen=True, kw_only=True)
class ShareGPTLike(_Prompts):
    """Chat-like lengths: input and output lengths lognormal (median, sigma), clipped to
    [min, max]. Synthetic; the parameters are ours, not a fit to the ShareGPT data set."""

    name: typing.ClassVar[str] = "sharegpt-like"
    input_median: int = 128
    input_sigma: float = 1.0
    input_min: int = 4
    input_max: int = 1024
    output_median: int = 96
    output_sigma: float = 0.7
    output_min: int = 4
    output_max: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        for side in ("input", "output"):
            lo, hi = getattr(self, f"{side}_min"), getattr(self, f"{side}_max")
            if lo > hi:
                raise ValueError(f"{side}_min ({lo}) > {side}_max ({hi})")
            if getattr(self, f"{side}_sigma") < 0:
                raise ValueError(f"{side}_sigma must be >= 0")

    def _length(self, rng: random.Random, side: str) -> int:
        median, sigma = getattr(self, f"{side}_median"), getattr(self, f"{side}_sigma")
        n = round(rng.lognormvariate(math.log(median), sigma))
        return min(max(n, getattr(self, f"{side}_min")), getattr(self, f"{side}_max"))

    def sample(self, rng: random.Random) -> RequestSpec:
        n_in = self._length(rng, "input")
        return self.request("sharegpt-like", self.tokens(rng, n_in), self._length(rng, "output"))


@dataclass(frozen=True, kw_only=True)
class Tenants(_Prompts):
    """`num_tenants` tenants, each with a fixed `prefix_len`-token prefix (a system prompt or
    document; fixed by `prefix_seed`, the same for every run and client), and per request a
    unique `suffix_len`-token suffix. Tenant i is drawn with weight 1/(i+1)^tenant_skew."""

    name: typing.ClassVar[str] = "tenants"
    num_tenants: int = 4
    prefix_len: int = 512
    suffix_len: int = 32
    output_len: int = 32
    tenant_skew: float = 0.0
    prefix_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tenants < 1:
            raise ValueError(f"num_tenants must be >= 1, got {self.num_tenants}")
        if self.tenant_skew < 0:
            raise ValueError(f"tenant_skew must be >= 0, got {self.tenant_skew}")

    def prefix(self, tenant: int) -> list[int]:
        # A string seed hashes the same in every process (unlike hash() of a tuple).
        return self.tokens(random.Random(f"tenant:{self.prefix_seed}:{tenant}"), self.prefix_len)

    def sample(self, rng: random.Random) -> RequestSpec:
        weights = [1 / (i + 1) ** self.tenant_skew for i in range(self.num_tenants)]
        tenant = rng.choices(range(self.num_tenants), weights)[0]
        return self.request(f"tenant-{tenant}", self.prefix(tenant) + self.tokens(rng, self.suffix_len),
                            self.output_len)


@dataclass(frozen=True, kw_only=True)
class LongShort(_Prompts):
    """A `long_fraction` of requests has `long_len` prompt tokens, the rest `short_len`
    (kinds "long" and "short"): short chats arriving while long prompts prefill."""

    name: typing.ClassVar[str] = "long-short"
    long_len: int = 1024
    short_len: int = 64
    long_fraction: float = 0.25
    long_output_len: int = 32
    short_output_len: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.long_fraction <= 1:
            raise ValueError(f"long_fraction must be in [0, 1], got {self.long_fraction}")

    def sample(self, rng: random.Random) -> RequestSpec:
        if rng.random() < self.long_fraction:
            return self.request("long", self.tokens(rng, self.long_len), self.long_output_len)
        return self.request("short", self.tokens(rng, self.short_len), self.short_output_len)


class Workload(typing.Protocol):
    """Anything with a `name` and `sample(rng)`: the four below, or one of a caller's own (a
    dataclass, so its parameters land in the results file)."""

    name: typing.ClassVar[str]

    def sample(self, rng: random.Random) -> RequestSpec: ...


WORKLOADS: dict[str, type] = {w.name: w for w in (ShareGPTLike, Fixed, Tenants, LongShort)}


def specs(workload: Workload, seed: int | str) -> Iterator[RequestSpec]:
    """An endless, deterministic stream of requests: the same seed gives the same requests."""
    rng = random.Random(seed)
    while True:
        yield workload.sample(rng)


def parse_params(text: str) -> dict[str, str]:
    """`"long_len=512, long_fraction=0.5"` -> {"long_len": "512", "long_fraction": "0.5"}."""
    params = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"workload parameter {item!r} is not KEY=VALUE")
        params[key.strip()] = value.strip()
    return params


def make_workload(name: str, params: Mapping[str, object] | None = None) -> Workload:
    """The workload called `name` with `params` (strings are converted to each field's type)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[name](**typed_kwargs(WORKLOADS[name], params or {}, f"workload {name!r}"))


def typed_kwargs(cls: type, params: Mapping[str, object], what: str) -> dict[str, object]:
    """`params` checked against the fields of dataclass `cls`, strings converted to each
    field's scalar type (int, float, str, bool; "none" for an optional field)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in params.items():
        if key not in fields:
            raise ValueError(f"{what} has no parameter {key!r}; it has {', '.join(sorted(fields))}")
        kwargs[key] = _convert(key, value, hints[key]) if isinstance(value, str) else value
    return kwargs


def _convert(key: str, value: str, hint: object) -> object:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and value.lower() == "none":
        return None
    kind = next((t for t in options if t is not type(None)), str)
    if kind is bool and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    if kind in (int, float, str):
        try:
            return kind(value)
        except ValueError:
            pass
    raise ValueError(f"parameter {key}={value!r} is not a {getattr(kind, '__name__', kind)}")


def params_of(workload: Workload) -> dict[str, object]:
    """Every parameter with its value, for the results file."""
    return dataclasses.asdict(workload) if dataclasses.is_dataclass(workload) else {}


def describe() -> str:
    """One line per workload with its parameters and defaults (for --help)."""
    lines = []
    for name, cls in WORKLOADS.items():
        defaults = " ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        lines.append(f"{name}: {defaults}")
    return "\n".join(lines)


def poisson_arrivals(rate: float, duration: float, rng: random.Random) -> list[float]:
    """Arrival times in [0, duration) of a Poisson process of `rate` requests per second."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0, got {rate}, {duration}")
    times, t = [], rng.expovariate(rate)
    while t < duration:
        times.append(t)
        t += rng.expovariate(rate)
    return times
