"""Release methods behind one registry: each name says which module runs it and with which objective.

A method is one file (its family's module), one entry here and one config block. This module imports no
torch, so the config can check method names without loading a model. Built so far: the fine-tuning
objectives of rr/methods/finetune.py (GA, NPO and ME forget losses, alone or with a GD or KL retain term).
"""

from __future__ import annotations

from dataclasses import dataclass

from rr.errors import RRError


@dataclass(frozen=True)
class Method:
    """One release method: `family` is the module under rr/methods that runs it."""

    name: str
    family: str
    summary: str
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


_FORGET = {"ga": "gradient ascent on the forget tokens",
           "npo": "negative preference optimization against the starting model (β = npo_beta)",
           "me": "maximize the entropy of every next-token prediction on the forget data (papers/004)"}
_RETAIN = {"gd": "gradient descent on retain data", "kl": "KL to the starting model on retain data"}

for _forget, _retain in (("ga", None), ("ga", "gd"), ("ga", "kl"), ("npo", None), ("npo", "gd"), ("npo", "kl"),
                         ("me", "gd")):
    register(Method(name=_forget if _retain is None else f"{_forget}+{_retain}", family="finetune",
                    summary=_FORGET[_forget] + ("" if _retain is None else ", with " + _RETAIN[_retain]),
                    forget_loss=_forget, retain_loss=_retain))

FINETUNE_METHODS = tuple(name for name, method in METHODS.items() if method.family == "finetune")
