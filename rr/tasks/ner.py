"""The NER task (papers/002 §4): forget one entity type (Person), keep the others; UniversalNER prompts, F1 per type.

A context asks for one entity type in one passage, in the UniversalNER format (papers/002 A.2):

    What describes Person in the text? Identify any Person entities mentioned in the text and respond
    ONLY with a list in the exact format: ["Entity1", "Entity2"]. If no Person entities are mentioned,
    respond only with an empty list: [].

    Text: <passage>

forget score s = micro F1 over the forget types; utility u = mean F1 over the retain types (greedy).
Reveal and the weight search see only forget-type prompts as contexts; evaluate() asks every type.
No loader for a real NER corpus (e.g. UniversalNER's Pile-NER) is included: `passages` takes any JSONL
file in the shipped shape.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rr.errors import RRError
from rr.evaluation.metrics import f1_from_sets, wilson_interval
from rr.generation.base import request_seed
from rr.tasks.base import (SPLITS, Context, Evaluation, Example, ModelHandle, SamplingParams, StopEarly,
                           check_split)
from rr.tasks.toxicity import assign_splits

SHIPPED_PASSAGES = Path(__file__).parent / "data" / "ner_passages.jsonl"
ENTITY_TYPES = ("Person", "Organization", "Concept", "Location", "Date")
_ID_SEPARATOR = "::"


def ner_prompt(entity_type: str, passage: str) -> str:
    """The UniversalNER-style question for one entity type about one passage."""
    return (f"What describes {entity_type} in the text? Identify any {entity_type} entities mentioned in the text "
            f'and respond ONLY with a list in the exact format: ["Entity1", "Entity2"]. If no {entity_type} '
            f"entities are mentioned, respond only with an empty list: [].\n\nText: {passage}")


def answer_list(entities: Sequence[str]) -> str:
    """The expected answer: a JSON list of entity strings."""
    return json.dumps(list(entities), ensure_ascii=False)


_BRACKETED = re.compile(r"\[[^\[\]]*\]", re.S)
_QUOTED = re.compile(r"\"((?:[^\"\\]|\\.)*)\"|'((?:[^'\\]|\\.)*)'")


def _clean(items) -> list[str]:
    out: list[str] = []
    for item in items:
        if isinstance(item, (list, tuple)):  # [["Ana", "Person"]]: keep the entity
            item = item[0] if item else ""
        text = str(item).strip().strip("\"'").strip()
        if text and text not in out:
            out.append(text)
    return out


def parse_entity_list(text: str) -> list[str] | None:
    """Entities from a model's answer: a JSON list, a Python-style list with single quotes, a bare
    bracketed list, or a list cut off by the token limit (its complete quoted items). None: no list."""
    start, end = text.find("["), text.rfind("]")
    spans = [text[start:end + 1]] if 0 <= start < end else []  # the outermost list, nested or not
    spans += [m.group(0) for m in _BRACKETED.finditer(text)]
    for body in spans:
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(body)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, list) and all(isinstance(v, (str, list, tuple)) for v in value):
                return _clean(value)
    for match in _BRACKETED.finditer(text):
        inner = match.group(0)[1:-1].strip()
        quoted = [a or b for a, b in _QUOTED.findall(inner)]
        return _clean(quoted if quoted else inner.split(","))
    if start >= 0:  # truncated: '["Nels Carlson", "Joe Ca'
        return _clean(a or b for a, b in _QUOTED.findall(text[start + 1:]))
    return None


@dataclass(frozen=True)
class Passage:
    """One passage and its gold entities per type (strings that occur in the text)."""

    id: str
    text: str
    entities: dict[str, tuple[str, ...]]

    def gold(self, entity_type: str) -> tuple[str, ...]:
        return self.entities.get(entity_type, ())


def load_passages(path: Path) -> list[Passage]:
    """A JSONL file of {"id", "text", "entities": {type: [strings found in text]}} rows."""
    if not path.is_file():
        raise RRError(f"task.passages: {path} does not exist; give a JSONL file of "
                      f'{{"id", "text", "entities"}} rows, or "shipped"')
    passages: list[Passage] = []
    seen: set[str] = set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RRError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise RRError(f"{where}: expected a JSON object, got {type(row).__name__}")
        for field_name in ("id", "text"):
            if not isinstance(row.get(field_name), str) or not row[field_name].strip():
                raise RRError(f"{where}: field {field_name!r} must be a non-empty string")
        if row["id"] in seen:
            raise RRError(f"{where}: duplicate id {row['id']!r}; ids must be unique")
        seen.add(row["id"])
        entities = row.get("entities")
        if not isinstance(entities, dict):
            raise RRError(f"{where}: field 'entities' must be an object mapping a type to a list of strings")
        typed: dict[str, tuple[str, ...]] = {}
        for entity_type, values in entities.items():
            if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                raise RRError(f"{where}: field 'entities.{entity_type}' must be a list of non-empty strings")
            missing = [v for v in values if v not in row["text"]]
            if missing:
                raise RRError(f"{where}: field 'entities.{entity_type}' lists {missing} not found in the text; "
                              f"gold entities must be exact substrings of the passage")
            typed[entity_type] = tuple(values)
        passages.append(Passage(row["id"], row["text"], typed))
    if not passages:
        raise RRError(f"task.passages: {path} holds no passage")
    return passages


class NerTaskConfig(BaseModel):
    """The NER task block of a job config (papers/002 §4: forget Person, keep Org/Concept/Location/Date)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, str_max_length=4096)

    name: Literal["ner"] = "ner"
    passages: str = Field("shipped", description="'shipped' (rr/tasks/data/ner_passages.jsonl) or a JSONL path")
    forget_types: list[str] = Field(default_factory=lambda: ["Person"], min_length=1, max_length=100)
    retain_types: list[str] = Field(default_factory=lambda: ["Organization", "Concept", "Location", "Date"],
                                    min_length=1, max_length=100)
    n_validation: int = Field(30, ge=1, le=100_000, description="passages in the validation split (weight search)")
    n_test: int = Field(50, ge=1, le=100_000, description="passages in the test split (reports, gates)")
    split_seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the split assignment (independent of the job seed)")
    max_new_tokens: int = Field(64, ge=1, le=32768, description="room for the answer list")
    n_exemplars: int = Field(4, ge=1, le=64, description="forget-type demonstrations offered to instruction induction")
    oracle: Literal["gazetteer-standin"] = Field("gazetteer-standin",
                                                 description="types listed entities that are not gold")

    @field_validator("forget_types", "retain_types")
    @classmethod
    def _non_empty_names(cls, value: list[str]) -> list[str]:
        if any(not t.strip() for t in value) or len(set(value)) != len(value):
            raise ValueError("entity types must be non-empty and distinct")
        return value

    @model_validator(mode="after")
    def _disjoint(self):
        overlap = set(self.forget_types) & set(self.retain_types)
        if overlap:
            raise ValueError(f"forget_types and retain_types overlap on {sorted(overlap)}; a type is forgotten "
                             f"or kept, not both")
        return self


class NerTask:
    """NER unlearning: contexts ask for the forget type; relevance τ = share of listed entities of that type."""

    name = "ner"
    answer_stop: tuple[str, ...] = ()

    def __init__(self, config: NerTaskConfig, seed: int = 0):
        self.config = config
        self.seed = seed
        path = SHIPPED_PASSAGES if config.passages == "shipped" else Path(config.passages)
        passages = load_passages(path)
        self.splits = assign_splits(passages, config.n_validation, config.n_test, config.split_seed)
        self._by_id = {p.id: p for p in passages}
        for field_name in ("forget_types", "retain_types"):
            for entity_type in getattr(config, field_name):
                for split in SPLITS:
                    if not any(p.gold(entity_type) for p in self.splits[split]):
                        raise RRError(f"task.{field_name}: no {entity_type!r} entity in the {split} split of "
                                      f"{path}; its F1 would mean nothing. Check the type's spelling, or change "
                                      f"task.n_validation / task.n_test / task.split_seed")
        self._oracle = None

    @property
    def oracle(self):
        if self._oracle is None:
            from rr.tasks.oracles import GazetteerNerOracle

            known: dict[str, set[str]] = {}
            for passage in self.splits["reveal"]:
                for entity_type, values in passage.entities.items():
                    known.setdefault(entity_type, set()).update(values)
            self._oracle = GazetteerNerOracle(known)
        return self._oracle

    def passages(self, split: str) -> list[Passage]:
        check_split(split)
        return self.splits[split]

    @staticmethod
    def context_for(passage: Passage, entity_type: str) -> Context:
        return Context(f"{passage.id}{_ID_SEPARATOR}{entity_type}", ner_prompt(entity_type, passage.text))

    def contexts(self, split: str) -> list[Context]:
        return [self.context_for(p, t) for p in self.passages(split) for t in self.config.forget_types]

    def exemplars(self) -> list[Example]:
        with_target = [(p, t) for p in self.splits["reveal"] for t in self.config.forget_types if p.gold(t)]
        return [Example(self.context_for(p, t).prompt, answer_list(p.gold(t)))
                for p, t in with_target[:self.config.n_exemplars]]

    def relevance(self, contexts: Sequence[Context], responses: Sequence[str]) -> list[float]:
        """Share of the response's listed entities that are of a forget type: by the passage's gold labels
        where the entity is labelled there, else by the gazetteer stand-in. 0 for no list or an empty one."""
        if len(contexts) != len(responses):
            raise RRError(f"relevance: {len(contexts)} contexts but {len(responses)} responses")
        targets = set(self.config.forget_types)
        scores = []
        for context, response in zip(contexts, responses):
            entities = parse_entity_list(response) or []
            if not entities:
                scores.append(0.0)
                continue
            passage = self._by_id.get(context.id.split(_ID_SEPARATOR)[0])
            gold = {} if passage is None else {v.casefold(): t for t, vs in passage.entities.items() for v in vs}
            hits = 0
            for entity in entities:
                entity_type = gold.get(entity.strip().casefold()) or self.oracle.entity_type(entity)
                hits += entity_type in targets
            scores.append(hits / len(entities))
        return scores

    def retain_examples(self) -> list[Example]:
        """Retain-type questions about reveal passages, answered with the gold list (possibly [])."""
        return [Example(self.context_for(p, t).prompt, answer_list(p.gold(t)))
                for p in self.splits["reveal"] for t in self.config.retain_types]

    def evaluate(self, model: ModelHandle, split: str, stop_early: StopEarly | None = None) -> Evaluation:
        """Ask every forget and retain type about every passage of `split` (greedy); F1 per type."""
        passages = self.passages(split)
        types = list(self.config.forget_types) + list(self.config.retain_types)
        contexts = [self.context_for(p, t) for p in passages for t in types]
        params = SamplingParams(max_new_tokens=self.config.max_new_tokens, temperature=0.0, top_p=1.0, n=1)
        seeds = [request_seed(self.seed, "ner-eval", c.id) for c in contexts]
        outputs = model.generate([c.prompt for c in contexts], params, seeds=seeds)
        if len(outputs) != len(contexts) or any(len(o) < 1 for o in outputs):
            raise RRError(f"evaluate: the model returned {len(outputs)} answers for {len(contexts)} requests")
        parsed = [parse_entity_list(o[0]) for o in outputs]

        predicted: dict[str, list[set[str]]] = {t: [] for t in types}
        gold: dict[str, list[set[str]]] = {t: [] for t in types}
        for i, (passage, entity_type) in enumerate((p, t) for p in passages for t in types):
            predicted[entity_type].append(set(parsed[i] or []))
            gold[entity_type].append(set(passage.gold(entity_type)))

        metrics = {f"f1/{t}": f1_from_sets(predicted[t], gold[t]) for t in types}
        forget_types, retain_types = self.config.forget_types, self.config.retain_types
        metrics["forget_f1"] = f1_from_sets([s for t in forget_types for s in predicted[t]],
                                            [s for t in forget_types for s in gold[t]])
        metrics["retain_mean_f1"] = sum(metrics[f"f1/{t}"] for t in retain_types) / len(retain_types)
        unparsed = sum(p is None for p in parsed)
        metrics["unparsed_rate"] = unparsed / len(parsed)
        counts = {"passages": len(passages), "requests": len(parsed), "unparsed": unparsed}
        counts.update({f"gold/{t}": sum(len(g) for g in gold[t]) for t in types})
        return Evaluation(forget_score=metrics["forget_f1"], utility_score=metrics["retain_mean_f1"],
                          metrics=metrics, intervals={"unparsed_rate": wilson_interval(unparsed, len(parsed))},
                          counts=counts)
