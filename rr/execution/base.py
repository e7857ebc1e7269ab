"""The Executor protocol: the work Reveal and Release hand out (generate, score candidates, train a PEM).

rr/reveal and rr/release never import ray (ARCHITECTURE.md invariant 1): they describe the model they
want as a *composition* (the ledger's (PEM, signed weight) entries on the base model, as data) and an
executor realizes it, in this process (local.py) or on Ray replicas and workers (ray.py). For the same
seed both give the same results: requests are seeded per request and batched the same way everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

from rr.release.ledger import Pem, WeightedPem
from rr.tasks.base import Evaluation, Example, ModelHandle, SamplingParams, StopEarly

Composition = Sequence[WeightedPem]  # () is the base model


class Executor(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], params: SamplingParams, seeds: Sequence[int] | None = None,
                 composition: Composition = ()) -> list[list[str]]:
        """Answers of the composed model; sample j of prompt i is seeded by request_seed(seeds[i], j)."""

    def evaluate(self, task, split: str, composition: Composition = ()) -> Evaluation:
        """task.evaluate on the composed model."""

    def model(self, composition: Composition = ()) -> ModelHandle:
        """The composed model as a ModelHandle (generate, perplexity, token_stats), for work that is not a task's
        evaluation (the audit's attacks). Valid until the executor is asked for another composition."""

    def search_weights(self, task, split: str, composition: Composition, pem: Pem, signed_weights: Sequence[float],
                       on_result: Callable[[float, Evaluation], None], decided: Callable[[], bool],
                       stop_early: StopEarly | None = None) -> None:
        """Score composition + (pem, w) for each w (ordered by magnitude), calling on_result(w, evaluation) in
        this process as each finishes; stop starting (and drop unfinished) candidates once decided() is true.
        With `stop_early`, the task may stop a candidate's scoring at those limits (Evaluation.stopped_early)."""

    def train_pem(self, composition: Composition, examples: Sequence[Example], config, name: str, kind: str,
                  out_dir: Path, seed: int, checkpoints: Sequence[int] = (), anchor: Sequence[Example] = (),
                  anchor_weight: float = 0.0, anchor_scale: float = 1.0) -> Pem:
        """rr.release.pem.train_pem on the composed model; the adapter is saved in out_dir (and after each of
        `checkpoints` updates in out_dir/step-N); a forget PEM anchored on `anchor` with β = `anchor_weight` at
        weight −`anchor_scale`."""

    def prepare(self, stage: str, work: int) -> None:
        """A sizing hint before a stage ("reveal": generation requests; "release": forget examples)."""

    def detach(self) -> None:
        """Hand the job's own model back as the base model (other code composes on it directly)."""

    def close(self) -> None:
        """Release workers; safe to call twice."""


def sized(work: int, per_unit: int, bounds: tuple[int, int]) -> int:
    """How many replicas or workers `work` calls for: ceil(work / per_unit) within [low, high]."""
    low, high = bounds
    return max(low, min(high, -(-max(work, 0) // per_unit)))


def concurrent_trials(setting: int | None, candidates: int, replicas: int, per_replica: int) -> int:
    """How many weight-search trials run at once: `setting` (compute.parallel_candidates) when given, else one
    per composition the replicas can serve at a time (a trial beyond that only queues behind the others, and
    scores a weight that a decided search would never have scored). Never more than the candidates."""
    wanted = setting if setting is not None else max(1, replicas) * max(1, per_replica)
    return max(1, min(candidates, wanted))
