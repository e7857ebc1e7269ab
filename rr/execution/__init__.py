"""Executors: where Reveal's generation and Release's candidate scoring and PEM training run."""

from __future__ import annotations

from rr.execution.base import Composition, Executor, sized

__all__ = ["Composition", "Executor", "make_executor", "sized"]


def make_executor(job) -> Executor:
    """The executor the job's compute.executor names (Ray is imported only for `ray`)."""
    if job.config.compute.executor == "ray":
        from rr.execution.ray import RayExecutor

        return RayExecutor(job)
    from rr.execution.local import LocalExecutor

    return LocalExecutor(job)
