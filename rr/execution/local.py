"""The in-process executor: one model in this process, compositions applied by forward hooks (ComposedModel)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from rr.core.profile import phase
from rr.execution.base import Composition
from rr.generation.answer_cache import AnswerCache, CachedModel, base_identity, composition_identity
from rr.release.ledger import ComposedModel, Pem
from rr.tasks.base import Evaluation, Example, SamplingParams, StopEarly


class VllmComposition:
    """A ModelHandle for `composition` on the job's in-process vLLM engine (generate, perplexity: one rank-sum
    adapter). vLLM gives only the top-k log-probs of each token, so the token statistics (answer probability,
    the audit's membership scores) come from the job's transformers model with the same composition by hooks."""

    per_prompt_params = True  # as the vLLM generator it serves

    def __init__(self, executor: "LocalExecutor", composition: Composition):
        self.executor, self.composition = executor, list(composition)

    def _served(self):
        generator = self.executor.job.generator
        generator.use_adapter(*self.executor._adapter_dir(self.composition))
        return generator

    def generate(self, prompts, params: SamplingParams, seeds=None):
        return self._served().generate(prompts, params, seeds)

    def perplexity(self, texts) -> float:
        return self._served().perplexity(texts)

    def token_stats(self, prompts, answers):
        from rr.generation.hf import job_generator

        self.executor._compose(self.composition)
        return job_generator(self.executor.job).token_stats(prompts, answers)


class LocalExecutor:
    """Everything runs on `job.model` through `job.generator`, candidates one at a time, smallest first."""

    name = "local"

    def __init__(self, job):
        self.job = job
        self._composed: ComposedModel | None = None
        self._adapters: dict[tuple, Path] = {}
        self.answers = AnswerCache(job.dir / "cache" / "answers", job.config.generation.answer_cache_mb * 2**20)
        self._base_identity: dict | None = None

    # ---- the composition on the job's model ---------------------------------------------------------------
    def _handle(self, composition: Composition):
        """The job's generator, serving `composition`, its generate calls through the job's answer cache."""
        generator = self.job.generator
        if hasattr(generator, "use_adapter"):  # vLLM: no hooks; the composition is one rank-sum adapter
            handle = VllmComposition(self, composition)
        else:
            self._compose(composition)
            handle = generator
        if self.answers.max_bytes <= 0:
            return handle
        return CachedModel(handle, self.answers, {**self._identity(), "composition": composition_identity(composition)})

    def _identity(self) -> dict:
        """What decides an answer besides the composition and the call: the base model, backend and settings."""
        import torch

        if self._base_identity is None:
            config = self.job.config
            generator = self.job.generator
            self._base_identity = base_identity(
                self.job, not hasattr(generator, "use_adapter"), backend=config.generation.backend,
                batch_size=config.generation.batch_size, device=self.job.device, system_prompt=getattr(generator, "system_prompt", None),
                max_prompt_tokens=getattr(generator, "max_prompt_tokens", None))
        return {**self._base_identity, "threads": torch.get_num_threads()}

    def _compose(self, composition: Composition) -> None:
        wanted = [(weighted.pem, float(weighted.merge_weight)) for weighted in composition]
        if not wanted:
            self.detach()
            return
        if self._composed is None:
            self._composed = ComposedModel(self.job.model)
        have = self._composed.entries
        if len(have) == len(wanted) and all(h.pem is pem for h, (pem, _) in zip(have, wanted)):
            for index, (h, (_, weight)) in enumerate(zip(have, wanted)):
                if h.merge_weight != weight:
                    self._composed.set_weight(index, weight)  # runtime scaling: no re-merge, no reload
            return
        self._composed.detach()
        for pem, weight in wanted:
            self._composed.append(pem, weight)

    def _adapter_dir(self, composition: Composition) -> tuple[Path | None, int | None]:
        from rr.release.ledger import export_adapter

        if not composition:
            return None, None
        key = tuple((w.pem.name, float(w.merge_weight)) for w in composition)
        if key not in self._adapters:
            out = self.job.dir / "adapters" / f"composition-{len(self._adapters)}"
            self._adapters[key] = export_adapter(list(composition), out, self.job.generator.model)
        return self._adapters[key], sum(w.pem.rank for w in composition)

    def detach(self) -> None:
        if self._composed is not None:
            self._composed.detach()

    # ---- the Executor protocol ---------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None,
                 composition: Composition = ()) -> list[list[str]]:
        return self._handle(composition).generate(prompts, params, seeds)

    def evaluate(self, task, split: str, composition: Composition = ()) -> Evaluation:
        return task.evaluate(self._handle(composition), split)

    def model(self, composition: Composition = ()):
        return self._handle(composition)

    def search_weights(self, task, split: str, composition: Composition, pem: Pem, signed_weights: Sequence[float],
                       on_result: Callable[[float, Evaluation], None], decided: Callable[[], bool],
                       stop_early: StopEarly | None = None) -> None:
        from rr.release.ledger import WeightedPem

        for weight in sorted(signed_weights, key=abs):
            if decided():
                return
            with phase(f"candidate {weight:+g}"):
                evaluation = task.evaluate(self._handle([*composition, WeightedPem(pem, weight)]), split,
                                           stop_early=stop_early)
            on_result(weight, evaluation)

    def train_pem(self, composition: Composition, examples: Sequence[Example], config, name: str, kind: str,
                  out_dir: Path, seed: int, checkpoints: Sequence[int] = (), anchor: Sequence[Example] = (),
                  anchor_weight: float = 0.0, anchor_scale: float = 1.0) -> Pem:
        from rr.release.pem import train_pem

        self._compose(composition)  # the new PEM learns on top of the composed model
        return train_pem(self.job.model, self.job.tokenizer, examples, config, name, kind, out_dir, seed=seed,
                         checkpoints=checkpoints, anchor=anchor, anchor_weight=anchor_weight,
                         anchor_scale=anchor_scale)

    def prepare(self, stage: str, work: int) -> None:
        """Nothing to size: one model, in this process."""

    def close(self) -> None:
        self.detach()
