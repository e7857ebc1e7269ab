"""MLflow tracking for rr jobs: the recorder stages call, the registry's promotion gates, the registered model."""

from rr.tracking.recorder import Recorder


def load_registered(model_uri: str, tracking_uri: str | None = None):
    """`models:/NAME@champion` as a pyfunc whose predict(list of prompts) returns one answer per prompt."""
    from rr.tracking.pyfunc import load_registered as load

    return load(model_uri, tracking_uri)


__all__ = ["Recorder", "load_registered"]
