"""The entity-knowledge task (papers/004's setting): forget what the model knows about some people, keep what it
knows about their neighbours.

The shipped people (rr/tasks/data/entities.json) are fictitious, written for rr: 20 people × 9 facts, each a
question, a one-sentence statement and a short answer, and 4 more facts each that no split uses, set aside for
`rr audit` (2 to relearn from, 2 to ask membership non-members about: rr/tasks/entity_audit.py). SmolLM2-135M knows none of them, so forgetting them
is meaningless until the model has learned them: as TOFU (papers/004 §5.1) fine-tunes on its fictitious
authors first, `python -m rr.tasks.entity learn --output DIR` fine-tunes the embedded model on every
statement (all splits and the set-aside facts) and saves a "knowledgeable" model; configs/entity.yaml points model.name_or_path to
it. Each person's facts are dealt to the splits in rotation (3 reveal, 3 validation, 3 test), so the splits
ask disjoint questions about the same people. The default forgets 7 people (21 forget facts a split) and
keeps 13 as neighbours.

Forms (rr/tasks/entity_forms.py): every fact is asked in each form of its split: the shipped question, a
paraphrase and a raw statement completion on every split (Reveal: the two chat forms), and on the test split
also a fill-in-the-blank, an indirect question and a French question (held out).

- contexts: the forget people's facts of the split in the split's forms; the reveal split adds "Tell me
  about …" prompts, so Reveal generates its forget data by prompting the model about the entity.
- relevance oracle τ (fact-match, declared): the highest ROUGE-L recall of any of the context's person's
  shipped answers in the response (1 when it states one of their facts).
- forget score: forget accuracy (the answer's ROUGE-L recall ≥ correct_threshold in a greedy answer) pooled
  over the split's forms (or, with forget_decision: worst-form, the highest of any form); per form beside
  it. Utility: the same on neighbour questions, pooled over forms. Both with Wilson intervals. Also reported,
  on the shipped question form (papers/004's metrics): ROUGE-L recall against the statement, answer
  probability, token entropy, the embedder's cosine (CS), MU (harmonic mean on neighbours) and FE (1 − mean
  on the forget people). TR and ES are not computed (no perturbed answers, no NLI model).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rr.core.tokens import TokenStatsUnavailable
from rr.errors import RRError
from rr.evaluation.memorization import (forget_efficacy, model_utility, rouge_l_recall,
                                        token_entropy, words)
from rr.evaluation.metrics import wilson_interval
from rr.generation.base import request_seed
from rr.tasks.base import (SPLITS, Context, Evaluation, Example, ModelHandle, SamplingParams, StopEarly,
                           check_forms)
from rr.tasks.entity_forms import (ENTITY_FORMS, ENTITY_FORMS_BY_SPLIT, ENTITY_HELD_OUT_FORMS, SEPARATOR, EntityFormItem,
                                   Fact, entity_form_items, split_forms)

SHIPPED_ENTITIES = Path(__file__).parent / "data" / "entities.json"
AUDIT_USES = ("relearn", "non-member")  # what a person's set-aside ("audit_facts") fact is for in `rr audit`
_OPEN_PROMPTS = ("Tell me about {name}.", "Write a short biography of {name}.")
DEFAULT_FORGET_PEOPLE = ("Marisol Quenby", "Oren Vasquel", "Tamsin Holloway-Reyes", "Henrike Solvang",
                         "Amadou Kerrigan", "Liesl Marchetti", "Teodor Blackwood")


def load_people(path: Path) -> dict[str, list[dict]]:
    """{name: [fact rows]} from a JSON list of {"name", "facts": [{"id", "question", "statement", "answer"}],
    "audit_facts" (optional): [the same, with "use": relearn or non-member]}. A person's audit facts follow
    their facts in the list, each with its "use"; no split deals them."""
    if not path.is_file():
        raise RRError(f"task.entities: {path} does not exist; give a JSON file of people, or 'shipped'")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RRError(f"task.entities: {path} is not valid JSON ({exc.msg})") from None
    people: dict[str, list[dict]] = {}
    for index, row in enumerate(rows):
        name, facts = row.get("name"), row.get("facts")
        if not isinstance(name, str) or not name.strip() or not isinstance(facts, list) or len(facts) < len(SPLITS):
            raise RRError(f"task.entities: {path}, person {index}: needs a 'name' and at least 3 'facts'")
        audit_facts = row.get("audit_facts", [])
        if not isinstance(audit_facts, list) or any(not isinstance(f, dict) or f.get("use") not in AUDIT_USES
                                                      for f in audit_facts):
            raise RRError(f"task.entities: {path}, {name}: 'audit_facts' must be a list of facts, each with a 'use' "
                          f"of {' or '.join(AUDIT_USES)}")
        if any("use" in fact for fact in facts):
            raise RRError(f"task.entities: {path}, {name}: a fact in 'facts' has a 'use'; set-aside facts go in "
                          "'audit_facts'")
        for fact in facts + audit_facts:
            missing = [k for k in ("id", "question", "statement", "answer") if not str(fact.get(k, "")).strip()]
            if missing:
                raise RRError(f"task.entities: {path}, {name}: a fact lacks {missing}")
            if rouge_l_recall(fact["statement"], fact["answer"]) < 1.0:
                raise RRError(f"task.entities: {path}, {name}/{fact['id']}: the answer {fact['answer']!r} is not in "
                              f"its statement")
        if name in people:
            raise RRError(f"task.entities: {path}: {name!r} appears twice")
        people[name] = facts + audit_facts
    return people


class EntityTaskConfig(BaseModel):
    """The entity task block: forget some people's facts, keep their neighbours' (papers/004 §5.3 setting)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, str_max_length=4096)

    name: Literal["entity"] = "entity"
    entities: str = Field("shipped", description="'shipped' (rr/tasks/data/entities.json, fictitious people) or a "
                          "JSON path")
    forget_entities: list[str] = Field(default_factory=lambda: list(DEFAULT_FORGET_PEOPLE), min_length=1,
                                       max_length=10_000)
    forms: list[str] | None = Field(None, description="the forms to ask (rr/tasks/entity_forms.py); default all "
                                    "six. Each split asks those of its forms listed here")
    forget_decision: Literal["pooled", "worst-form"] = Field(
        "pooled", description="the forget score of a split: forget accuracy pooled over the items of all its "
                              "forms, or the highest accuracy of any one form (the form that forgot least)")
    max_new_tokens: int = Field(40, ge=1, le=32768)
    correct_threshold: float = Field(1.0, gt=0, le=1, description="ROUGE-L recall of the short answer that counts "
                                     "as a correct answer (1: every answer word, in order)")
    n_exemplars: int = Field(3, ge=1, le=64)
    cosine_similarity: bool = Field(True, description="report papers/004's CS with `embedder` (loads it)")
    embedder: str = "embedded:all-minilm-l6-v2"
    oracle: Literal["fact-match"] = Field("fact-match", description="relevance: the person's shipped answers "
                                          "found in the response")

    @field_validator("forget_entities")
    @classmethod
    def _distinct(cls, names):
        if len(set(names)) != len(names):
            raise ValueError("forget_entities lists a person twice")
        return names

    @field_validator("forms")
    @classmethod
    def _known_forms(cls, forms):
        check_forms(forms, list(ENTITY_FORMS), ENTITY_FORMS_BY_SPLIT)
        return forms


class EntityTask:
    name = "entity"
    answer_stop: tuple[str, ...] = ()
    held_out_forms = ENTITY_HELD_OUT_FORMS  # in the test split only
    form_metric = "forget accuracy"

    def __init__(self, config: EntityTaskConfig, seed: int = 0):
        self.config = config
        self.seed = seed
        path = SHIPPED_ENTITIES if config.entities == "shipped" else Path(config.entities)
        people = load_people(path)
        unknown = [n for n in config.forget_entities if n not in people]
        if unknown:
            raise RRError(f"task.forget_entities: {unknown} are not in {path}; choose from {sorted(people)}")
        self.forget_people = list(config.forget_entities)
        self.neighbours = [n for n in people if n not in self.forget_people]
        if not self.neighbours:
            raise RRError("task.forget_entities lists every person: keep at least one as a neighbour")
        self.facts: list[Fact] = []
        self.audit_facts: list[Fact] = []  # no split's: `rr audit`'s (their split is their use)
        for person_index, (name, rows) in enumerate(people.items()):
            dealt = [row for row in rows if "use" not in row]
            for fact_index, row in enumerate(dealt):
                split = SPLITS[(fact_index + person_index) % len(SPLITS)]
                self.facts.append(Fact(name, row["id"], row["question"], row["statement"], row["answer"], split))
            self.audit_facts += [Fact(name, row["id"], row["question"], row["statement"], row["answer"], row["use"])
                                 for row in rows if "use" in row]
        self._answers = {}  # the relevance oracle's: the split facts only
        for fact in self.facts:
            self._answers.setdefault(fact.person, []).append(fact.answer)
        self._embedder = None

    def facts_of(self, people: Sequence[str], split: str) -> list[Fact]:
        if split not in SPLITS:
            raise RRError(f"split {split!r} is not one of {SPLITS}")
        return [f for f in self.facts if f.person in people and f.split == split]

    def form_items(self, people: Sequence[str], split: str) -> list[EntityFormItem]:
        """The (fact, form) items of `people` on a split: every fact in each of the split's forms."""
        return entity_form_items(self.facts_of(people, split), split, self.config.forms)

    def contexts(self, split: str) -> list[Context]:
        """The forget people's (fact, form) items of the split (a one-turn chat form as its user text, a raw
        completion as its Prompt); the reveal split adds open prompts about each person."""
        contexts = [Context(item.id, item.request()) for item in self.form_items(self.forget_people, split)]
        if split == "reveal":
            contexts += [Context(f"{name}{SEPARATOR}open{i}", template.format(name=name))
                         for name in self.forget_people for i, template in enumerate(_OPEN_PROMPTS)]
        return contexts

    def exemplars(self) -> list[Example]:
        facts = self.facts_of(self.forget_people, "reveal")
        return [Example(f.question, f.statement) for f in facts[:self.config.n_exemplars]]

    def relevance(self, contexts: Sequence[Context], responses: Sequence[str]) -> list[float]:
        if len(contexts) != len(responses):
            raise RRError(f"relevance: {len(contexts)} contexts but {len(responses)} responses")
        scores = []
        for context, response in zip(contexts, responses):
            person = context.id.split(SEPARATOR)[0]
            answers = self._answers.get(person)
            if answers is None:  # a context from elsewhere: any forget person's fact counts
                answers = [a for name in self.forget_people for a in self._answers[name]]
            scores.append(max(rouge_l_recall(response, answer) for answer in answers))
        return scores

    def retain_examples(self) -> list[Example]:
        """Neighbours' reveal-split facts with their statements (never validation or test), in each development
        form the task asks (the question, a paraphrase, a raw statement completion): the retain PEM keeps
        answering in the forms the forget data is asked in, so refusing a form is not a way to forget."""
        forms = split_forms("validation", self.config.forms)  # the development forms
        items = [EntityFormItem(fact, form) for fact in self.facts_of(self.neighbours, "reveal") for form in forms]
        return [Example(item.request(), item.answer_suffix()) for item in items]

    def external_forget_examples(self) -> list[Example]:
        """The forget people's reveal-split facts with their true statements (TOFU's forget set; compare.forget_data:
        external)."""
        return [Example(f.question, f.statement) for f in self.facts_of(self.forget_people, "reveal")]

    def training_examples(self) -> list[Example]:
        """Every fact of every person, all splits and the set-aside ones: what `learn` teaches the model before
        any unlearning (the relearning attack relearns facts the model knew; non-members ask about known facts)."""
        return [Example(f.question, f.statement) for f in self.facts + self.audit_facts]

    def knows(self, response: str, fact: Fact) -> bool:
        """Whether a response gives the fact's short answer (ROUGE-L recall ≥ task.correct_threshold)."""
        return rouge_l_recall(response, fact.answer) >= self.config.correct_threshold

    def _embed(self, texts):
        if self._embedder is None:
            from rr.models import load_embedder

            self._embedder = load_embedder(self.config.embedder)
        return self._embedder.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True,
                                     show_progress_bar=False)

    def evaluate(self, model: ModelHandle, split: str, stop_early: StopEarly | None = None) -> Evaluation:
        """Forget and neighbour accuracy per form and pooled over the split's forms, greedy; papers/004's
        other metrics on the split's first form (the shipped question unless task.forms drops it)."""
        groups = {"forget": self.form_items(self.forget_people, split),
                  "neighbour": self.form_items(self.neighbours, split)}
        items = groups["forget"] + groups["neighbour"]
        params = SamplingParams(max_new_tokens=self.config.max_new_tokens, temperature=0.0, top_p=1.0, n=1)
        outputs = model.generate([item.request() for item in items], params,
                                 seeds=[request_seed(self.seed, "entity-eval", item.id) for item in items])
        if len(outputs) != len(items):
            raise RRError(f"evaluate: the model returned {len(outputs)} answers for {len(items)} prompts")
        answers = {item.id: output[0] for item, output in zip(items, outputs)}
        correct = {item.id: self.knows(answers[item.id], item.fact) for item in items}
        forms = split_forms(split, self.config.forms)
        metrics: dict[str, float] = {}
        intervals, counts = {}, {}
        by_form: dict[str, list[int]] = {}
        for group, group_items in groups.items():
            hits, n = sum(correct[item.id] for item in group_items), len(group_items)
            metrics[f"{group}_accuracy"] = hits / n
            intervals[f"{group}_accuracy"] = wilson_interval(hits, n)
            counts[f"{group}_questions"] = len({item.fact for item in group_items})
            counts[f"{group}_items"] = n
            for form in forms:
                form_hits = [correct[item.id] for item in group_items if item.form == form]
                metrics[f"{group}_accuracy/{form}"] = sum(form_hits) / len(form_hits)
                intervals[f"{group}_accuracy/{form}"] = wilson_interval(sum(form_hits), len(form_hits))
                if group == "forget":
                    by_form[form] = [sum(form_hits), len(form_hits)]
        metrics["forget_accuracy_worst_form"] = max(hits / n for hits, n in by_form.values())
        metrics.update(self._memorization_metrics(model, {group: [item for item in group_items if item.form == forms[0]]
                                                          for group, group_items in groups.items()}, answers))
        forget_score = (metrics["forget_accuracy"] if self.config.forget_decision == "pooled"
                        else metrics["forget_accuracy_worst_form"])
        return Evaluation(forget_score=forget_score, utility_score=metrics["neighbour_accuracy"],
                          metrics=metrics, intervals=intervals, counts=counts, forms=by_form)

    def _memorization_metrics(self, model: ModelHandle, groups: dict[str, list[EntityFormItem]],
                              answers: dict[str, str]) -> dict[str, float]:
        """papers/004's metrics of one form's answers: ROUGE-L recall of the statement, answer probability
        (teacher-forced, from the model handle's token statistics), the embedder's cosine, token entropy (neighbours),
        MU and FE."""
        items = [item for group_items in groups.values() for item in group_items]
        try:
            stats = model.token_stats([item.request() for item in items], [item.answer_suffix() for item in items])
            teacher = {item.id: item_stats.answer_probability for item, item_stats in zip(items, stats)}
        except TokenStatsUnavailable:  # vLLM until its side is built: the metric is left out, not approximated
            teacher = None
        metrics: dict[str, float] = {}
        parts: dict[str, dict[str, float]] = {}
        for group, group_items in groups.items():
            outs, n = [answers[item.id] for item in group_items], len(group_items)
            part = {"rouge_l_recall": sum(rouge_l_recall(o, item.fact.statement)
                                          for o, item in zip(outs, group_items)) / n}
            if teacher is not None:
                part["answer_probability"] = sum(teacher[item.id] for item in group_items) / n
            if self.config.cosine_similarity:
                import numpy as np

                statements = [item.fact.statement for item in group_items]
                vectors = np.asarray(self._embed(outs + statements), dtype=np.float64)
                part["cosine_similarity"] = float(np.clip((vectors[:n] * vectors[n:]).sum(1), 0, 1).mean())
            if group == "neighbour":
                part["token_entropy"] = sum(token_entropy(words(o)) for o in outs) / n
            parts[group] = part
            metrics.update({f"{group}_{k}": v for k, v in part.items()})
        metrics["model_utility"] = model_utility(list(parts["neighbour"].values()))
        metrics["forget_efficacy"] = forget_efficacy(list(parts["forget"].values()))
        return metrics


# ---- the "knowledgeable" model: learn the facts before unlearning them ------------------------------------


def learn_facts(model, tokenizer, examples: Sequence[Example], epochs: int = 8, learning_rate: float = 1e-4,
                batch_size: int = 8, seed: int = 0) -> list[float]:
    """Full-weight fine-tuning on the statements (TOFU's first step); returns the mean loss of each epoch."""
    import torch

    from rr.core.tokens import batches, collate, encode_examples, pad_token_id
    from rr.methods.losses import nll_loss

    encoded = encode_examples(tokenizer, examples, 256)
    device = next(model.parameters()).device
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    order = batches(len(encoded), batch_size, torch.Generator().manual_seed(seed))
    per_epoch = -(-len(encoded) // batch_size)
    history = []
    for _ in range(epochs):
        total = 0.0
        for _ in range(per_epoch):
            batch = collate([encoded[i] for i in next(order)], pad_token_id(tokenizer), device)
            loss = nll_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
        history.append(total / per_epoch)
    model.eval().requires_grad_(False)
    return history


def main(argv: Sequence[str] | None = None) -> None:
    """python -m rr.tasks.entity learn --output DIR: the embedded model, fine-tuned on the shipped people."""
    import argparse
    import time

    import torch

    from rr.generation.hf import HFGenerator
    from rr.models import load_model_and_tokenizer

    parser = argparse.ArgumentParser(prog="python -m rr.tasks.entity")
    parser.add_argument("command", choices=["learn"])
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--entities", default="shipped")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = EntityTask(EntityTaskConfig(entities=args.entities, cosine_similarity=False))
    model, tokenizer = load_model_and_tokenizer(args.model)
    generator = HFGenerator(model, tokenizer, batch_size=32)
    before = task.evaluate(generator, "test")
    started = time.perf_counter()
    losses = learn_facts(model, tokenizer, task.training_examples(), args.epochs, args.learning_rate)
    after = task.evaluate(generator, "test")
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    report = {"base_model": args.model, "epochs": args.epochs, "learning_rate": args.learning_rate,
              "epoch_losses": losses, "wall_time_s": time.perf_counter() - started,
              "test_before": {"forget_accuracy": before.metrics["forget_accuracy"],
                              "neighbour_accuracy": before.metrics["neighbour_accuracy"]},
              "test_after": {"forget_accuracy": after.metrics["forget_accuracy"],
                             "neighbour_accuracy": after.metrics["neighbour_accuracy"]}}
    (args.output / "learned_facts.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
