"""Structured output: the grammar module and the sampler's mask on crafted logits (a 16-token
vocabulary, exact expectations), then the engine on a tiny dummy model with the real
tokenizer: JSON schemas, n > 1, preemption, remote prefill, logit_bias."""

from __future__ import annotations

import json
import re

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from services.engine import InvalidRequestError, SamplingParams, StructuredOutputParams
from services.engine.outputs import SampledToken
from services.engine.sampler import Sampler
from services.engine.scheduler import SampleSpec
from services.engine.structured_output import GrammarCompiler, apply_grammars, check
from tests.conftest import assert_all_free, make_llm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Token id = index; 0 is the stop token.
VOCAB = ["<eos>", "{", "}", '"', "a", "b", ":", ",", " ", "1", "2", "ab", "yes", "no", "y", "es"]
EOS, A, B, AB, YES, NO, Y, ES = 0, 4, 5, 11, 12, 13, 14, 15
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture
def compiler() -> GrammarCompiler:
    return GrammarCompiler.for_vocab(VOCAB, stop_token_ids=(EOS,))


def regex(pattern: str) -> StructuredOutputParams:
    return StructuredOutputParams(regex=pattern)


def spec_for(state, params: SamplingParams = GREEDY, seq=(0,), output=()) -> SampleSpec:
    return SampleSpec(params=params, seq_indices=seq, num_prompt_tokens=1, token_ids=[7, *output], grammar=state)


def allowed(compiler: GrammarCompiler, state) -> list[int]:
    logits = torch.zeros(1, len(VOCAB))
    apply_grammars(logits, [(0, state)])
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def sample(logits: list[list[float]], specs: list[SampleSpec]) -> list[list[SampledToken]]:
    return Sampler(eos_token_ids=(EOS,))(torch.tensor(logits), specs)


def favouring(*order: int) -> list[float]:
    """Logits where `order[0]` is the most likely token, then order[1], ...; the rest at -5."""
    row = [-5.0] * len(VOCAB)
    for rank, token in enumerate(order):
        row[token] = 10.0 - rank
    return row


# ---- the grammar module ------------------------------------------------------------------------


def test_regex_allows_exactly_the_tokens_that_continue_a_match(compiler):
    state = compiler.new_state(compiler.compile(regex("ab")))
    assert allowed(compiler, state) == [A, AB]
    assert state.accept(A)
    assert allowed(compiler, state) == [B]
    assert state.accept(B)
    assert allowed(compiler, state) == [EOS]  # complete: only the stop token
    assert not state.terminated and state.accept(EOS) and state.terminated


def test_a_forbidden_token_is_refused_and_leaves_the_state_unchanged(compiler):
    state = compiler.new_state(compiler.compile(regex("ab")))
    assert not state.accept(B)
    assert allowed(compiler, state) == [A, AB]


def test_choice_allows_the_first_tokens_of_each_choice(compiler):
    state = compiler.new_state(compiler.compile(StructuredOutputParams(choice=("yes", "no"))))
    assert allowed(compiler, state) == [YES, NO, Y]
    assert state.accept(Y) and allowed(compiler, state) == [ES]


def test_compiled_grammars_are_cached_by_spec(compiler):
    first = compiler.compile(regex("ab"))
    assert compiler.compile(regex("ab")) is first and compiler.num_compiled == 1
    compiler.compile(regex("a"))
    assert compiler.num_compiled == 2


def test_the_cache_evicts_the_least_recently_used_grammar():
    compiler = GrammarCompiler(GrammarCompiler.for_vocab(VOCAB, (EOS,))._make_info, max_cached=2)
    ab = compiler.compile(regex("ab"))
    compiler.compile(regex("a"))
    compiler.compile(regex("ab"))  # "a" is now the least recently used
    compiler.compile(regex("b"))
    assert compiler.compile(regex("ab")) is ab and compiler.num_compiled == 3
    compiler.compile(regex("a"))
    assert compiler.num_compiled == 4


@pytest.mark.parametrize(
    "spec, message",
    [
        (StructuredOutputParams(regex="[a-"), "invalid regex: Regex parsing error at position 4: Unclosed '['"),
        (StructuredOutputParams(json_schema='{"type": "foo"}'), 'invalid json schema: Unsupported type "foo"'),
        (StructuredOutputParams(grammar='root ::= foo'), 'invalid grammar: EBNF parser error at line 1, column 10'),
    ],
)
def test_an_invalid_spec_is_an_invalid_request_with_xgrammars_reason(spec, message):
    with pytest.raises(InvalidRequestError) as err:
        check(spec)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"regex": "a", "grammar": 'root ::= "a"'}, "got 2"),
        ({"json_schema": "{nope"}, "not valid JSON"),
        ({"json_schema": "[1]"}, "must be a JSON object"),
        ({"choice": ()}, "choice takes 1 to 256"),
        ({"regex": ""}, "non-empty"),
    ],
)
def test_structured_output_params_are_validated_on_construction(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        StructuredOutputParams(**kwargs)


def test_a_schema_dict_is_stored_as_json_text():
    assert StructuredOutputParams(json_schema={"type": "object"}).key == ("json_schema", '{"type": "object"}')


# ---- the sampler's mask --------------------------------------------------------------------------


def test_greedy_picks_the_best_allowed_token_not_the_best_token(compiler):
    state = compiler.new_state(compiler.compile(regex("ab")))
    (group,) = sample([favouring(B, 2, EOS, A, AB)], [spec_for(state)])
    assert [t.token_id for t in group] == [A]


def test_random_draws_only_ever_pick_allowed_tokens(compiler):
    state = compiler.new_state(compiler.compile(StructuredOutputParams(choice=("yes", "no"))))
    params = SamplingParams(temperature=1.0, seed=3)
    drawn = {sample([[0.0] * len(VOCAB)], [spec_for(state, params, output=(9,) * i)])[0][0].token_id
             for i in range(200)}
    assert drawn == {YES, NO, Y}


def test_only_constrained_rows_are_masked(compiler):
    state = compiler.new_state(compiler.compile(regex("ab")))
    rows = [favouring(B, A), favouring(B, A)]
    groups = sample(rows, [spec_for(None), spec_for(state)])
    assert [g[0].token_id for g in groups] == [B, A]


def test_forked_rows_share_one_state_and_one_mask(compiler):
    state = compiler.new_state(compiler.compile(regex("ab")))
    params = SamplingParams(temperature=1.0, seed=1, n=4)
    (group,) = sample([favouring(B, A, AB)], [spec_for(state, params, seq=(0, 1, 2, 3))])
    assert len(group) == 4 and {t.token_id for t in group} <= {A, AB}


def test_logprobs_stay_those_of_the_raw_distribution(compiler):
    state = compiler.new_state(compiler.compile(regex("ab")))
    row = favouring(B, A)
    raw = torch.log_softmax(torch.tensor(row), dim=-1)
    (group,) = sample([row], [spec_for(state, SamplingParams(temperature=0.0, logprobs=1))])
    (token,) = group
    assert token.token_id == A
    assert token.logprobs[A].rank == 2 and token.logprobs[A].logprob == pytest.approx(float(raw[A]))
    assert token.logprobs[B].rank == 1 and token.logprobs[B].logprob == pytest.approx(float(raw[B]))


def test_min_tokens_gives_way_when_the_grammar_allows_only_the_stop_token(compiler):
    state = compiler.new_state(compiler.compile(regex("a")))
    assert state.accept(A)
    params = SamplingParams(temperature=0.0, min_tokens=5)
    (group,) = sample([favouring(B, A)], [spec_for(state, params, output=(A,))])
    assert group[0].token_id == EOS


def test_min_tokens_still_masks_eos_where_the_grammar_allows_more(compiler):
    state = compiler.new_state(compiler.compile(regex("a(b)?")))
    assert state.accept(A)
    params = SamplingParams(temperature=0.0, min_tokens=5)
    (group,) = sample([favouring(EOS, B)], [spec_for(state, params, output=(A,))])
    assert group[0].token_id == B


def test_logit_bias_adds_to_the_logits_and_leaves_logprobs_raw():
    row = favouring(B, A)  # B 10, A 9
    params = SamplingParams(temperature=0.0, logprobs=0, logit_bias={A: 1.5})
    (group,) = sample([row], [spec_for(None, params)])
    raw = torch.log_softmax(torch.tensor(row), dim=-1)
    assert group[0].token_id == A and group[0].logprobs[A].logprob == pytest.approx(float(raw[A]))
    (group,) = sample([row], [spec_for(None, SamplingParams(temperature=0.0, logit_bias={A: 0.5}))])
    assert group[0].token_id == B


def test_logit_bias_is_validated():
    with pytest.raises(InvalidRequestError, match=r"in \[-100, 100\]"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(InvalidRequestError, match="token ids"):
        SamplingParams(logit_bias={-1: 1})


# ---- the engine, with the real tokenizer -----------------------------------------------------------


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(pattern="^(cat|dog|fish)$")
    legs: int = Field(ge=0, le=8)


class Owner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    pets: list[Pet] = Field(min_length=1, max_length=2)


OWNER = StructuredOutputParams(json_schema=Owner.model_json_schema())
PROMPT = list(range(300, 340))


@pytest.fixture(scope="module")
def llm():
    return make_llm("tiny-llama")


def constrained(n=1, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 120)
    return SamplingParams(n=n, temperature=1.0, seed=11, structured_output=OWNER, **kw)


def assert_valid_owners(out) -> None:
    for c in out.outputs:
        assert c.finish_reason == "stop", c.text
        Owner.model_validate_json(c.text, strict=True)
        assert c.token_ids[-1] == EOS_TOKEN


EOS_TOKEN = 2  # the tiny presets' EOS


def test_random_weights_still_produce_valid_json_for_every_sequence(llm):
    out = llm.generate(PROMPT, constrained(n=4))[0]
    assert_valid_owners(out)
    assert len({c.text for c in out.outputs}) > 1  # each sequence its own state and its own draws
    assert_all_free(llm)


def test_a_complete_match_stops_the_sequence_even_with_ignore_eos(llm):
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True,
                            structured_output=StructuredOutputParams(choice=("pineapple", "kiwi")))
    (c,) = llm.generate(PROMPT, params)[0].outputs
    assert c.text in ("pineapple", "kiwi") and c.finish_reason == "stop" and c.stop_reason is None


def test_regex_output_matches(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=40,
                            structured_output=StructuredOutputParams(regex=r"[A-Z][a-z]{2,6}-[0-9]{3}"))
    for c in llm.generate(PROMPT, params)[0].outputs:
        assert re.fullmatch(r"[A-Z][a-z]{2,6}-[0-9]{3}", c.text) and c.finish_reason == "stop"


def test_preemption_recomputes_kv_and_the_grammar_state_carries_on(llm):
    expected = [c.text for c in llm.generate(PROMPT, constrained(n=3))[0].outputs]
    small = make_llm("tiny-llama", num_kv_blocks=12, max_model_len=160)
    outs = small.generate([PROMPT, PROMPT[::-1]], [constrained(n=3), constrained(n=3)])
    assert small.engine.scheduler.num_preemptions > 0
    assert [c.text for c in outs[0].outputs] == expected
    assert_valid_owners(outs[1])
    assert_all_free(small)


def test_an_invalid_schema_is_rejected_before_any_block_is_allocated(llm):
    bad = SamplingParams(structured_output=StructuredOutputParams(json_schema='{"type": "object", "required": 3}'))
    with pytest.raises(InvalidRequestError, match="invalid json schema"):
        llm.generate(PROMPT, bad)
    assert_all_free(llm)


def test_json_object_gives_an_object(llm):
    params = SamplingParams(temperature=0.0, max_tokens=60, structured_output=StructuredOutputParams(json_object=True))
    (c,) = llm.generate(PROMPT, params)[0].outputs
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.text), dict)
    else:  # random weights may ramble inside a string: the prefix is still an object's start
        assert c.finish_reason == "length" and c.text.startswith("{")


def test_logit_bias_token_ids_beyond_the_vocabulary_are_rejected(llm):
    with pytest.raises(InvalidRequestError, match="logit_bias token ids"):
        llm.generate(PROMPT, SamplingParams(logit_bias={10**6: 1.0}))


def test_remote_prefill_samples_the_first_token_under_the_grammar_and_decode_carries_on(llm):
    from tests.test_kv_transfer import disaggregated

    prefill, decode = make_llm("tiny-llama"), make_llm("tiny-llama")
    prompt = list(range(1000, 1090))
    expected = llm.generate(prompt, constrained(n=2))[0]
    out, request, blocks = disaggregated(prefill, decode, prompt, constrained(n=2))
    assert request.kv_import.state == "done" and len(blocks) == 6
    assert [c.text for c in out.outputs] == [c.text for c in expected.outputs]
    assert_valid_owners(out)
    assert_all_free(prefill)
    assert_all_free(decode)
