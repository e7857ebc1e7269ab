"""Release methods behind one registry: each name says which module runs it and with which objective.

A method is one file (its family's module under rr/methods), one entry here and one config block. Every
family module has `run_method(job, method, data, out_dir, progress) -> MethodRun`: it unlearns the job's forget
set (self-generated, or external) from the job's base model, with the task's retain data, and scores the
result on the test split (rr/compare.py calls it). This module imports no torch, so the config can check
method names without loading a model.

| method | family module | config block |
|---|---|---|
| reveal-release | reveal_release.py (the job's own release stage, Eq. 1) | release |
| pem-negation | pem_negation.py (one forget PEM, one weight chosen on validation) | release |
| ga, ga+gd, ga+kl, npo, npo+gd, npo+kl, me+gd | finetune.py | compare.finetune |
| idk+gd, idk+ap, dpo, dpo+gd, dpo+ap | targeted.py (papers/004: refusals as targets; AP keeps retain answers) | compare.targeted |
| icu | icu.py (papers/003: GA + KNN-analogous learning + KL, per-sample forgetting gates) | compare.icu |
| rmu | rmu.py (steer one layer's forget activations to a random direction) | compare.rmu |
| ext-sub | ext_sub.py (expert − α·deficiency of the anti-expert PEM, α on validation) | compare.ext_sub, release.lora |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rr.errors import RRError


# What `rr compare`'s table says a method applied, from its MethodRun.details (each method's spec names one).
def ledger_note(details: dict) -> str:
    return "ledger " + ", ".join(f"{e['merge_weight']:+g}·{e['kind'][0].upper()}" for e in details["ledger"])


def merge_weight_note(details: dict) -> str:
    return f"weight {details['merge_weight']:+g} ({details['rule']})"


def alpha_note(details: dict) -> str:
    return f"α {details['alpha']:g} ({details['rule']})"


def training_note(details: dict) -> str:
    """The training methods: the settings that say what each did (the ones its details carry)."""
    parts = [f"{details['steps']} steps"]
    for key, label in (("weights", ""), ("learning_rate", "lr "), ("layer", "layer "),
                       ("steering_coefficient", "c "), ("remaining_forget_samples", "forget samples left ")):
        if key in details:
            value = details[key]
            parts.append(f"{label}{value:g}" if isinstance(value, float) else f"{label}{value}")
    return ", ".join(parts)


@dataclass(frozen=True)
class Method:
    """One release method: `family` is the module under rr/methods that runs it."""

    name: str
    family: str               # module under rr/methods that runs it
    summary: str
    settings: tuple[str, ...]  # the config blocks or keys (dotted) its result depends on: changed, it is re-run
    note: Callable[[dict], str]  # what the compare table says it applied, from its MethodRun.details
    forget_loss: str | None = None  # fine-tuning family: "ga" | "npo" | "me"
    retain_loss: str | None = None  # fine-tuning family: None | "gd" | "kl"

    @property
    def needs_reference(self) -> bool:
        """Whether training needs the frozen model it started from (NPO's ratio, the KL term)."""
        return self.forget_loss == "npo" or self.retain_loss == "kl"

    @property
    def needs_retain_data(self) -> bool:
        return self.retain_loss is not None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise RRError(f"release method {method.name!r} is registered twice; give the new one another name")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise RRError(f"unknown release method {name!r}: choose one of {', '.join(METHODS)}") from None


register(Method(name="reveal-release", family="reveal_release", settings=("release",), note=ledger_note,
                summary="Φ0 − μ0·ΔF0 + Σ(λi·ΔRi − μi·ΔFi): forget and retain PEMs composed step by step, each weight "
                        "chosen on validation by the paper's rules (the job's release stage; release.max_perplexity_rise and "
                        "min_general_check_ratio add to the λ rule's target)"))
register(Method(name="pem-negation", family="pem_negation", settings=("release",), note=merge_weight_note,
                summary="one forget PEM trained on the forget set and negated once, its weight chosen on validation "
                        "by the μ rule (PEM-external in papers/002)"))

_FORGET = {"ga": "gradient ascent on the forget tokens",
           "npo": "negative preference optimization against the starting model (β = npo_beta)",
           "me": "maximize the entropy of every next-token prediction on the forget data (papers/004)"}
_RETAIN = {"gd": "gradient descent on retain data", "kl": "KL to the starting model on retain data"}

def _register_combinations(family: str, forget: dict[str, str], retain: dict[str, str],
                           pairs: tuple[tuple[str, str | None], ...], settings: tuple[str, ...]) -> None:
    """One method per (forget loss, retain loss or None), named "forget" or "forget+retain"."""
    for forget_loss, retain_loss in pairs:
        register(Method(name=forget_loss if retain_loss is None else f"{forget_loss}+{retain_loss}", family=family,
                        summary=forget[forget_loss] + ("" if retain_loss is None else ", with " + retain[retain_loss]),
                        settings=settings, note=training_note, forget_loss=forget_loss, retain_loss=retain_loss))


_register_combinations("finetune", _FORGET, _RETAIN, (("ga", None), ("ga", "gd"), ("ga", "kl"), ("npo", None),
                                                      ("npo", "gd"), ("npo", "kl"), ("me", "gd")), ("compare.finetune",))

FINETUNE_METHODS = tuple(name for name, method in METHODS.items() if method.family == "finetune")


@dataclass
class ReleaseData:
    """What every method of one comparison consumes: the same forget set and the same retain data."""

    forget: list           # rr.tasks.base.Example
    retain: list
    source: str            # "self-generated" (reveal/forget_set.jsonl) or "external"


@dataclass
class MethodRun:
    """What one method did in `rr compare`: its model's test-split evaluation (an evaluation_dict), how long
    it took (training and weight search, not the final test scoring) and method-specific details."""

    method: str
    test: dict
    wall_time_s: float | None   # None: not measured (a release finished before rr recorded timings)
    details: dict


# ---- beyond fine-tuning: targeted unlearning (papers/004), ICU (papers/003), RMU, Ext-Sub ------------------------------

_TARGETED_FORGET = {"idk": "answer forget questions with a refusal (IDK fine-tuning)",
                    "dpo": "DPO preferring a refusal over the forget answer (against the starting model)"}
_TARGETED_RETAIN = {"gd": "gradient descent on retain data",
                    "ap": "answer preservation: retain answers kept above refusals (papers/004 Eq. 8)"}
_register_combinations("targeted", _TARGETED_FORGET, _TARGETED_RETAIN,
                       (("idk", "gd"), ("idk", "ap"), ("dpo", None), ("dpo", "gd"), ("dpo", "ap")), ("compare.targeted",))
register(Method(name="icu", family="icu", settings=("compare.icu",), note=training_note,
                summary="gradient ascent on forget sequences, NLL and KL on each one's nearest retain example, "
                        "forgotten samples dropped after each epoch (ICU, papers/003)"))
register(Method(name="rmu", family="rmu", settings=("compare.rmu",), note=training_note,
                summary="steer one layer's activations on forget data toward a scaled random vector, hold them "
                        "on retain data (RMU)"))
register(Method(name="ext-sub", family="ext_sub", note=alpha_note,
                settings=("compare.ext_sub", "release.lora", "release.forget_fraction", "release.forget_utility_floor"),
                summary="expert PEM (retain) minus α × the deficiency part of an anti-expert PEM (forget), α "
                        "chosen on validation (Ext-Sub)"))

TARGETED_METHODS = tuple(name for name, method in METHODS.items() if method.family == "targeted")
