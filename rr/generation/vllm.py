"""vLLM generation for GPU nodes (optional extra `rr[gpu]`): same SamplingParams and per-request seeds as hf.py.

vLLM has no per-request LoRA scale, so a composition (or a candidate merge weight) is served as its own
rank-sum adapter directory (rr.release.ledger.export_adapter) and selected per call with `use_adapter`.
Not runnable on the CPU machines rr is developed on: vLLM ships GPU-only wheels.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Sequence

from rr.core.prompt import Prompt, as_prompt
from rr.errors import RRError
from rr.generation.base import request_seed, tidy_answer
from rr.tasks.base import SamplingParams


class VLLMGenerator:
    def __init__(self, model: str, *, gpu_memory_utilization: float = 0.85, max_lora_rank: int = 64,
                 max_loras: int = 8, seed: int = 0, dtype: str = "auto", revision: str | None = None):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise RRError("generation.backend: 'vllm' needs the GPU extra: pip install 'rr[gpu]' "
                          "(vLLM wheels need a CUDA GPU); use backend: hf on CPU") from exc
        self.llm = LLM(model=model, enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras,
                       gpu_memory_utilization=gpu_memory_utilization, seed=seed, dtype=dtype, revision=revision)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_lora_rank = max_lora_rank
        self._adapter = None
        self._adapter_ids = itertools.count(1)

    @classmethod
    def from_config(cls, config, job_dir: Path) -> "VLLMGenerator":
        from rr.models import resolve_model

        source = resolve_model(config.model.name_or_path, config.model.gguf_file)
        model = str(Path(source.path) / source.gguf_file) if source.gguf_file else source.path
        g = config.generation
        return cls(model, gpu_memory_utilization=g.vllm_gpu_memory_utilization, max_lora_rank=g.vllm_max_lora_rank,
                   max_loras=g.vllm_max_loras, seed=config.seed, dtype=config.model.dtype, revision=config.model.revision)

    def use_adapter(self, adapter_dir: Path | None, rank: int | None = None) -> None:
        """Serve base + this PEFT adapter from now on (None: the base model)."""
        from vllm.lora.request import LoRARequest

        if adapter_dir is None:
            self._adapter = None
            return
        if rank is not None and rank > self.max_lora_rank:
            raise RRError(f"the composed adapter has rank {rank} > generation.vllm_max_lora_rank "
                          f"{self.max_lora_rank}: raise it, or serve the merged export")
        self._adapter = LoRARequest(Path(adapter_dir).name, next(self._adapter_ids), str(adapter_dir))

    def _chat(self, prompt: "str | Prompt") -> str:
        """As HFGenerator.chat_text: a str is one user turn; a Prompt renders itself (raw: no template)."""
        return as_prompt(prompt).render(self.tokenizer)

    def generate(self, prompts: Sequence[str], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[list[str]]:
        from vllm import SamplingParams as VllmSamplingParams

        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        texts, per_request = [], []
        for i, prompt in enumerate(prompts):
            for j in range(params.n):
                texts.append(self._chat(prompt))
                per_request.append(VllmSamplingParams(
                    n=1, temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                    seed=request_seed(seeds[i], j) % (2**31), stop=list(params.stop) or None,
                    include_stop_str_in_output=True))
        outputs = self.llm.generate(texts, per_request, lora_request=self._adapter, use_tqdm=False)
        flat = [tidy_answer(o.outputs[0].text, prompts[k // params.n]) for k, o in enumerate(outputs)]
        return [flat[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]

    def perplexity(self, texts: Sequence[str]) -> float:
        from vllm import SamplingParams as VllmSamplingParams

        scoring = VllmSamplingParams(max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate(list(texts), scoring, lora_request=self._adapter, use_tqdm=False)
        total, count = 0.0, 0
        for output in outputs:
            for token_id, logprobs in zip(output.prompt_token_ids[1:], output.prompt_logprobs[1:]):
                total -= logprobs[token_id].logprob
                count += 1
        return math.exp(total / max(count, 1))

    def token_stats(self, prompts, answers):
        """vLLM returns the top-k log-probs of each prompt token, not the whole vocabulary's, so the mean and
        variance MinK++ needs are not at hand: refused rather than approximated."""
        from rr.core.tokens import TokenStatsUnavailable

        raise TokenStatsUnavailable("token statistics (answer probability, the audit's membership-inference scores) "
                                    "need the transformers backend: set generation.backend: hf for this stage")
