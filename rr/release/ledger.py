"""The unlearned model as a ledger: base + ordered (PEM, signed weight) entries, composed by hooks or exported.

Invariant 2 of ARCHITECTURE.md. The base weights are never modified. A ledger realizes as
  * forward hooks on the target nn.Linear modules (`ComposedModel`): y = W x + Σ_i w_i·s_i·B_i(A_i x),
    computed as one rank-sum (x @ A_catᵀ) @ B_catᵀ with w_i·s_i folded into A_cat, so changing a weight is
    a cheap refold, not a re-merge or a reload;
  * one PEFT LoRA of rank Σ r_i with scaling 1 (`rank_sum_adapter`, `export_adapter`), for serving;
  * merged weights W + Σ w_i·(α_i/r_i)·B_i·A_i (`merged_state_dict`, `export_merged`), for export.
Here s_i = α_i/r_i is the PEM's LoRA scaling and w_i its merge weight (−μ for forget PEMs, +λ for retain).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rr.core.files import atomic_write
from rr.errors import RRError

PEM_KINDS = ("forget", "retain", "composed", "relearn")  # relearn: the audit's attack
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEM_SIDECAR = "pem.json"  # rr's own fields (name, kind); PEFT and vLLM ignore it
_PEFT_PREFIX = "base_model.model."
LEDGER_FORMAT = 1


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise RRError(f"{path} is not valid JSON ({error}): restore it or re-create the adapter") from error


def _tensors_from_state(state: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)} from PEFT keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise RRError(f"{source}: tensor {key!r} is not a LoRA A/B weight; rr composes plain LoRA adapters only "
                          "(no modules_to_save, embeddings or DoRA)")
        halves.setdefault(match.group(1), {})[match.group(2)] = tensor
    tensors = {}
    for module, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise RRError(f"{source}: module {module} has lora_{'A' if 'A' in pair else 'B'} but not its partner")
        tensors[module] = (pair["A"], pair["B"])
    return tensors


# ---- one PEM ---------------------------------------------------------------------------------------------


def tensors_digest(named_tensors) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the order given."""
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pem_digest(pem: "Pem") -> str:
    """A PEM's content hash (rank, alpha, targets and every A/B tensor), computed once per Pem object."""
    cached = getattr(pem, "_content_digest", None)
    if cached is None:
        tensors = [(f"{module}.{part}", t) for module, pair in sorted(pem.tensors.items())
                   for part, t in zip("AB", pair)]
        cached = hashlib.sha256(f"{pem.rank}|{pem.alpha}|{sorted(pem.target_modules)}|{tensors_digest(tensors)}"
                                .encode()).hexdigest()
        pem._content_digest = cached
    return cached


@dataclass
class Pem:
    """A trained LoRA (parameter-efficient module): per target module, A (r×in) and B (out×r).

    `tensors` maps a full module name (`model.layers.0.self_attn.q_proj`) to (A, B). Its update to a
    module's weight is (alpha/rank)·B·A.
    """

    name: str
    kind: str
    rank: int
    alpha: float
    target_modules: list[str]
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def __post_init__(self):
        if self.kind not in PEM_KINDS:
            raise RRError(f"PEM {self.name!r}: kind {self.kind!r} is not one of {PEM_KINDS}")
        if not self.tensors:
            raise RRError(f"PEM {self.name!r} has no LoRA tensors: train it on at least one target module")
        for module, (a, b) in self.tensors.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != self.rank or b.shape[1] != self.rank:
                raise RRError(f"PEM {self.name!r}, module {module}: expected A (r×in) and B (out×r) with "
                              f"r={self.rank}, got A {tuple(a.shape)} and B {tuple(b.shape)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values())

    def save(self, path: str | Path, base_model_name: str | None = None) -> Path:
        """Write a standard PEFT adapter directory (loadable by PeftModel.from_pretrained and vLLM).

        pem.json is the completion marker a resume trusts (`is_saved`): it is removed first and written
        last, after the config and the weights, so a kill anywhere in between leaves a directory that is
        retrained, never one that is reused half-written."""
        from peft import LoraConfig

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / PEM_SIDECAR).unlink(missing_ok=True)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, bias="none",
                            target_modules=sorted(self.target_modules), task_type="CAUSAL_LM",
                            base_model_name_or_path=base_model_name)
        config.save_pretrained(str(path))
        state = {}
        for module, (a, b) in self.tensors.items():
            state[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = a.detach().to("cpu").contiguous()
            state[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = b.detach().to("cpu").contiguous()
        atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        sidecar = json.dumps({"name": self.name, "kind": self.kind}, indent=1)
        atomic_write(path / PEM_SIDECAR, lambda tmp: Path(tmp).write_text(sidecar))
        return path

    @staticmethod
    def is_saved(path: str | Path) -> bool:
        """Whether `save` finished writing this directory (its marker, pem.json, is written last)."""
        path = Path(path)
        return (path / PEM_SIDECAR).is_file() and (path / ADAPTER_WEIGHTS).is_file() and \
            (path / ADAPTER_CONFIG).is_file()

    @classmethod
    def load(cls, path: str | Path, kind: str | None = None) -> "Pem":
        """Read a PEFT LoRA adapter directory; name and kind come from rr's pem.json, or `kind=`."""
        path = Path(path)
        config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        if not config_path.is_file() or not weights_path.is_file():
            raise RRError(f"{path} is not a PEFT adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                          "(re-run the step that trained it, or point to the right directory)")
        config = _read_json(config_path)
        for unsupported, neutral in (("use_rslora", False), ("use_dora", False), ("rank_pattern", {}),
                                     ("alpha_pattern", {})):
            if config.get(unsupported) not in (None, neutral):
                raise RRError(f"{config_path}: {unsupported}={config[unsupported]!r} is not supported by the rr "
                              f"ledger (one rank and alpha per PEM); retrain with {unsupported} off")
        if config.get("peft_type", "LORA") != "LORA":
            raise RRError(f"{config_path}: peft_type {config['peft_type']!r} is not a LoRA")
        sidecar = _read_json(path / PEM_SIDECAR) if (path / PEM_SIDECAR).is_file() else {}
        kind = kind or sidecar.get("kind")
        if kind is None:
            raise RRError(f"{path} has no {PEM_SIDECAR} saying whether it is a forget or retain PEM; "
                          "pass kind= to Pem.load")
        tensors = _tensors_from_state(load_file(str(weights_path)), weights_path)
        rank = int(config["r"])
        return cls(name=sidecar.get("name", path.name), kind=kind, rank=rank,
                   alpha=float(config.get("lora_alpha", rank)),
                   target_modules=sorted({m.rsplit(".", 1)[-1] for m in tensors}), tensors=tensors)


class WeightedPem(NamedTuple):
    """A PEM as applied in a composition: its signed merge weight (−μ forget, +λ retain)."""

    pem: Pem
    merge_weight: float


# ---- the ledger file -------------------------------------------------------------------------------------


@dataclass
class LedgerEntry:
    """One applied step: which adapter (a directory relative to the ledger's root) with which signed weight."""

    pem_name: str
    adapter_dir: str
    kind: str
    merge_weight: float
    step: int


@dataclass
class Ledger:
    """The unlearned model: the base model id and the ordered entries applied on top of it."""

    base_model: str
    entries: list[LedgerEntry] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"format": LEDGER_FORMAT, "base_model": self.base_model,
                           "entries": [asdict(e) for e in self.entries]}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<ledger json>") -> "Ledger":
        try:
            raw = json.loads(text)
            if raw.get("format", LEDGER_FORMAT) != LEDGER_FORMAT:
                raise RRError(f"{source}: ledger format {raw['format']} is not {LEDGER_FORMAT}; "
                              "re-export it with this rr version")
            entries = [LedgerEntry(str(e["pem_name"]), str(e["adapter_dir"]), str(e["kind"]),
                                   float(e["merge_weight"]), int(e["step"])) for e in raw["entries"]]
            return cls(base_model=str(raw["base_model"]), entries=entries)
        except RRError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise RRError(f"{source} is not a valid rr ledger ({type(error).__name__}: {error}); it needs "
                          "base_model and entries of {pem_name, adapter_dir, kind, merge_weight, step}") from error

    def save(self, path: str | Path) -> None:
        """Atomic: a reader (or a resumed job) sees the old ledger or the new one, never half of one."""
        text = self.to_json()
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, path: str | Path) -> "Ledger":
        path = Path(path)
        if not path.is_file():
            raise RRError(f"ledger {path} does not exist: point to a job's release/ledger.json")
        return cls.from_json(path.read_text(), source=str(path))

    def resolve(self, root: str | Path) -> list[WeightedPem]:
        """Load every entry's PEM (adapter_dir is relative to `root`, the ledger's directory)."""
        return [WeightedPem(Pem.load(Path(root) / e.adapter_dir, kind=e.kind), e.merge_weight) for e in self.entries]


# ---- the math (pure functions) ---------------------------------------------------------------------------


def _check_shared_targets(entries: Sequence[WeightedPem]) -> list[str]:
    if not entries:
        raise RRError("the composition is empty: there is no adapter to build (use the base model as it is)")
    modules = sorted(entries[0].pem.tensors)
    for pem, _ in entries[1:]:
        if sorted(pem.tensors) != modules:
            raise RRError(f"PEM {pem.name!r} targets {sorted(pem.target_modules)} on {len(pem.tensors)} modules, but "
                          f"{entries[0].pem.name!r} targets {sorted(entries[0].pem.target_modules)} on {len(modules)}: "
                          "all PEMs of a ledger must share target modules (release.lora.target_modules)")
    return modules


def rank_sum_factors(entries: Sequence[WeightedPem], module: str, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat, B_cat) for one module: A_cat = concat_i(w_i·s_i·A_i) (Σr×in), B_cat = concat_i(B_i) (out×Σr)."""
    a_cat = torch.cat([pem.tensors[module][0].to(device=device, dtype=torch.float32) * (weight * pem.scaling)
                       for pem, weight in entries], dim=0)
    b_cat = torch.cat([pem.tensors[module][1].to(device=device, dtype=torch.float32) for pem, _ in entries], dim=1)
    return a_cat.to(dtype), b_cat.to(dtype)


def rank_sum_adapter(entries: Sequence[WeightedPem], name: str = "rank-sum") -> Pem:
    """The single LoRA that realizes the composition exactly: rank Σ r_i, lora_alpha = Σ r_i (scaling 1)."""
    modules = _check_shared_targets(entries)
    tensors = {m: rank_sum_factors(entries, m, device="cpu") for m in modules}
    rank = sum(pem.rank for pem, _ in entries)
    return Pem(name=name, kind="composed", rank=rank, alpha=float(rank),
               target_modules=sorted({t for pem, _ in entries for t in pem.target_modules}), tensors=tensors)


def export_adapter(entries: Sequence[WeightedPem] | Ledger, out_dir: str | Path, base_model_name: str,
                   ledger_root: str | Path | None = None) -> Path:
    """Write the rank-sum adapter as a PEFT adapter directory (PeftModel.from_pretrained, vLLM --lora-modules).

    A `Ledger` is resolved against `ledger_root` (the directory its adapter_dir paths are relative to).
    """
    if isinstance(entries, Ledger):
        if ledger_root is None:
            raise RRError("export_adapter got a Ledger without ledger_root: pass the directory holding ledger.json")
        entries = entries.resolve(ledger_root)
    return rank_sum_adapter(entries).save(out_dir, base_model_name=base_model_name)


def merged_state_dict(model: nn.Module, entries: Sequence[WeightedPem]) -> dict[str, torch.Tensor]:
    """The model's state dict with every target weight replaced by a new tensor W + Σ w·(α/r)·B·A.

    The model itself is not touched: merged weights are fresh tensors, the others are the model's own.
    """
    modules = _check_shared_targets(entries)
    state = dict(model.state_dict())
    for module in modules:
        key = f"{module}.weight"
        if key not in state:
            raise RRError(f"the model has no weight {key} that the ledger's PEMs target: was the ledger trained on "
                          "another base model (ledger base_model)?")
        weight = state[key]
        a_cat, b_cat = rank_sum_factors(entries, module, device=weight.device)
        if b_cat.shape[0] != weight.shape[0] or a_cat.shape[1] != weight.shape[1]:
            raise RRError(f"{module}: the PEMs' delta is {b_cat.shape[0]}×{a_cat.shape[1]} but the weight is "
                          f"{tuple(weight.shape)}: the ledger belongs to another base model")
        state[key] = (weight.detach().to(torch.float32) + b_cat @ a_cat).to(weight.dtype)
    return state


def export_merged(model: nn.Module, entries: Sequence[WeightedPem], out_dir: str | Path, tokenizer=None) -> Path:
    """Write a standalone HF model directory with the merged weights (the live model keeps its own)."""
    out_dir = Path(out_dir)
    state = merged_state_dict(model, entries)
    model.save_pretrained(str(out_dir), state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ---- runtime composition by forward hooks ----------------------------------------------------------------


def _is_rr_hook(hook) -> bool:
    return getattr(hook, "_rr_ledger_hook", False)


class ComposedModel:
    """A live HF causal LM with a composition applied by forward hooks on its target nn.Linear modules.

    Because the hooks sit on the original nn.Linear objects, PEFT can still wrap those Linears (it keeps
    them as `base_layer`) and train a new LoRA on top of the composed model.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._entries: list[WeightedPem] = []
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = []
        self._modules: dict[str, nn.Linear] = {}

    @property
    def entries(self) -> list[WeightedPem]:
        return list(self._entries)

    @property
    def merge_weights(self) -> list[float]:
        return [w for _, w in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, pem: Pem, merge_weight: float) -> None:
        entries = self._entries + [WeightedPem(pem, float(merge_weight))]
        _check_shared_targets(entries)
        modules = self._modules or self._find_targets(pem)
        for name, (a, b) in pem.tensors.items():
            if (b.shape[0], a.shape[1]) != tuple(modules[name].weight.shape):
                raise RRError(f"PEM {pem.name!r}, {name}: delta {b.shape[0]}×{a.shape[1]} does not match the weight "
                              f"{tuple(modules[name].weight.shape)}: it was trained on another base model")
        if not self._handles:
            self._modules = modules
            self._handles = [module.register_forward_hook(self._make_hook(name)) for name, module in modules.items()]
        self._entries = entries
        self._refold()

    def set_weight(self, index: int, merge_weight: float) -> None:
        """Runtime scaling: the next forward uses the new weight (no re-merge, no reload)."""
        if not -len(self._entries) <= index < len(self._entries):
            raise RRError(f"set_weight({index}): the composition has {len(self._entries)} entries")
        self._entries[index] = WeightedPem(self._entries[index].pem, float(merge_weight))
        self._refold()

    def pop(self) -> WeightedPem:
        if not self._entries:
            raise RRError("pop() on an empty composition")
        popped = self._entries.pop()
        if self._entries:
            self._refold()
        else:
            self._remove_hooks()
        return popped

    def detach(self) -> None:
        """Remove every hook: the model computes exactly what the base model computes."""
        self._entries = []
        self._remove_hooks()

    # -- internals --
    def _find_targets(self, pem: Pem) -> dict[str, nn.Linear]:
        modules = dict(self.model.named_modules())
        targets = {}
        for name in pem.tensors:
            module = modules.get(name)
            if module is None:
                raise RRError(f"PEM {pem.name!r} targets {name}, which this model does not have: it was trained "
                              "on another base model (model.name_or_path)")
            if not isinstance(module, nn.Linear):
                raise RRError(f"PEM {pem.name!r} targets {name}, a {type(module).__name__}, not an nn.Linear: compose "
                              "PEMs on the plain model, not on a PEFT-wrapped one")
            if any(_is_rr_hook(h) for h in module._forward_hooks.values()):
                raise RRError(f"{name} already carries a composition: detach() the other ComposedModel first")
            targets[name] = module
        return targets

    def _make_hook(self, name: str):
        factors = self._factors

        def hook(module, args, output):
            a_cat, b_cat = factors[name]
            x = args[0]
            return output + (x.to(a_cat.dtype) @ a_cat.T) @ b_cat.T

        hook._rr_ledger_hook = True
        return hook

    def _refold(self) -> None:
        for name, module in self._modules.items():
            self._factors[name] = rank_sum_factors(self._entries, name, dtype=module.weight.dtype,
                                                   device=module.weight.device)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._factors.clear()
        self._modules = {}
