"""`pdserve generate`: run prompts through the engine in this process and print the results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from services.cli.model_args import add_model_args, engine_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text for one or more prompts",
                       description="Generate completions. Greedy by default (--temperature 0).")
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--prompts-file", type=Path, help="JSON file holding a list of prompt strings")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line, in input order")
    p.add_argument("--url", help="send the prompts through a running router at HOST:PORT instead of loading a model")
    p.add_argument("--concurrency", type=int, default=1, help="with --url: requests in flight at once (default 1)")
    p.add_argument("--timeout", type=float, help="with --url: deadline per request, seconds")
    p.add_argument("--api-key", default=os.environ.get("PDSERVE_API_KEY"),
                   help="with --url: the router's API key (default $PDSERVE_API_KEY)")
    p.add_argument("--tls-ca", type=Path, help="with --url: the router speaks TLS; verify it with this CA certificate")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=int, default=64)
    s.add_argument("--min-tokens", type=int, default=0)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=-1)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--seed", type=int, help="per-request sampling seed (reproducible sampling)")
    s.add_argument("-n", type=int, default=1, help="completions per prompt")
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--logprobs", type=int, help="return this many top logprobs per token")
    c = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="SCHEMA", help="the output is JSON matching this schema (JSON text, or @FILE)")
    c.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    c.add_argument("--regex", help="the whole output matches this regex")
    c.add_argument("--grammar", help="the output matches this EBNF grammar, root rule `root` (text, or @FILE)")
    c.add_argument("--choice", action="append", help="the output is one of these strings (repeatable)")
    add_model_args(p)
    p.set_defaults(run=run)


def load_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        loaded = json.loads(args.prompts_file.read_text())
        if not isinstance(loaded, list) or not all(isinstance(x, str) for x in loaded):
            raise SystemExit("pdserve: error: --prompts-file must hold a JSON list of strings")
        prompts += loaded
    if not prompts:
        raise SystemExit("pdserve: error: give at least one PROMPT or --prompts-file")
    return prompts


def _text_or_file(value: str | None) -> str | None:
    return Path(value[1:]).read_text() if value and value.startswith("@") else value


def structured_output(args: argparse.Namespace):
    from services.engine import StructuredOutputParams

    schema, grammar = _text_or_file(args.json_schema), _text_or_file(args.grammar)
    if not (schema or args.json_object or args.regex or grammar or args.choice):
        return None
    return StructuredOutputParams(json_schema=schema, json_object=args.json_object, regex=args.regex,
                                  grammar=grammar, choice=args.choice)


def sampling_params(args: argparse.Namespace):
    from services.engine import SamplingParams

    return SamplingParams(
        structured_output=structured_output(args),
        n=args.n,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        seed=args.seed,
        max_tokens=args.max_tokens,
        min_tokens=args.min_tokens,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
        logprobs=args.logprobs,
    )


def run(args: argparse.Namespace) -> int:
    prompts = load_prompts(args)
    params = sampling_params(args)  # bad flags fail before the model loads
    if args.url:
        return run_remote(args, prompts, params)
    from services.engine import LLM

    llm = LLM(engine_config(args))
    if args.chat:
        inputs = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:
        inputs = prompts
    outputs = llm.generate(inputs, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        if args.json:
            print(json.dumps(to_json(prompt, out), ensure_ascii=False))
        else:
            for completion in out.outputs:
                print(f"{prompt}{completion.text}" if not args.chat else completion.text)
                print(f"-- {len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}", file=sys.stderr)
    return 0


def run_remote(args: argparse.Namespace, prompts: list[str], params) -> int:
    import asyncio

    import grpc

    from services.cli.client import generate_remote

    try:
        tls_ca = args.tls_ca.read_bytes() if args.tls_ca else None
        results = asyncio.run(generate_remote(args.url, prompts, params, args.chat, args.concurrency, args.timeout,
                                              args.api_key, tls_ca))
    except grpc.RpcError as e:
        print(f"pdserve: error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    for result in results:
        if args.json:
            print(json.dumps(result.to_json(), ensure_ascii=False))
        else:
            for c in sorted(result.completions.values(), key=lambda c: c.index):
                print(c.text if args.chat else f"{result.prompt}{c.text}")
                print(f"-- {len(c.token_ids)} tokens, finish_reason={c.finish_reason}", file=sys.stderr)
    return 0


def to_json(prompt: str, out) -> dict:
    first = out.outputs[0]
    record = {
        "prompt": prompt,
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": first.token_ids,
        "text": first.text,
        "finish_reason": first.finish_reason,
        "cached_tokens": out.num_cached_tokens,
    }
    if first.logprobs is not None:
        record["logprobs"] = [
            {str(t): lp.logprob for t, lp in pos.items()} for pos in first.logprobs
        ]
    if len(out.outputs) > 1:
        record["outputs"] = [
            {"index": c.index, "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason}
            for c in out.outputs
        ]
    return record
