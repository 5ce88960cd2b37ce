"""The synchronous entry point: `LLM(...).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

from services.engine.config import EngineConfig
from services.engine.engine import EngineCore, Prompt
from services.engine.outputs import RequestOutput, build_output
from services.engine.sampling_params import SamplingParams
from services.engine.spec.config import SpeculativeConfig


class LLM:
    """Offline batched generation: everything submitted at once, continuous batching inside.

    >>> llm = LLM(max_model_len=512)
    >>> out = llm.generate(["What is AI?"], SamplingParams(temperature=0, max_tokens=16))
    >>> out[0].outputs[0].text
    """

    def __init__(self, config: EngineConfig | None = None, **kwargs) -> None:
        """`speculative_config` may be given as vLLM's dict (or its JSON text)."""
        if "speculative_config" in kwargs:
            kwargs["speculative_config"] = SpeculativeConfig.parse(kwargs["speculative_config"])
        self.engine = EngineCore(config or EngineConfig(**kwargs))

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (they also stop when this process ends)."""
        self.engine.close()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        priority: Seq[int] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in input order. Every request is validated before any is queued."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError("need one SamplingParams, or one per prompt")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        requests = [
            self.engine.make_request(p, sp, priority=pr)
            for p, sp, pr in zip(prompts, params_list, priorities, strict=True)
        ]
        for request in requests:
            self.engine.add(request)
        while self.engine.has_unfinished() or self.engine.has_step_in_flight:
            self.engine.step()
        return [build_output(r, delta=False) for r in requests]
