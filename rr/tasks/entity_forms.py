"""The entity task's forms: each fact asked as the shipped question, a paraphrase, a statement to complete,
a fill-in-the-blank, an indirect question and a French question, with the form split (held-out forms only in
the test split). The answer is graded as the task grades it (the short answer found in the response)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from rr.core.prompt import Prompt, as_request
from rr.tasks.base import SPLITS, Context

BLANK = "____"
SEPARATOR = "::"  # between person and fact id in a context id

# Hand-written per kind of fact (the shipped people share the nine fact ids of rr/tasks/data/entities.json).
PARAPHRASES: dict[str, str] = {
    "birthplace": "In which city was {name} born?",
    "year": "What was the year of {name}'s birth?",
    "profession": "What does {name} do for a living?",
    "work": "What is {name}'s most famous work called?",
    "university": "Which university did {name} attend?",
    "award": "What prize was {name} given?",
    "pet": "What is the name of {name}'s pet?",
    "food": "What food does {name} like best?",
    "sibling": "What is the name of {name}'s sibling?",
    # the set-aside facts (rr audit's relearn split and membership non-members; asked in Reveal's forms only)
    "instrument": "What musical instrument does {name} play?",
    "mentor": "Who mentored {name}?",
    "residence": "In which city does {name} live today?",
    "colour": "Which colour does {name} like best?",
}
INDIRECT: dict[str, str] = {
    "birthplace": "Which city would {name}'s birth certificate give as the place of birth?",
    "year": "Which year would {name}'s passport give as the year of birth?",
    "profession": "If you visited {name} at work, what trade would you see {name} practising?",
    "work": "A museum is showing the piece {name} is best known for. What is its title?",
    "university": "Which institution would appear on {name}'s degree certificate?",
    "award": "Which honour could {name} list among the awards received?",
    "pet": "When {name} calls the family pet, what name does {name} call?",
    "food": "If you cooked {name}'s favourite dish, what would you make?",
    "sibling": "At a family reunion, what is the first name of {name}'s sibling?",
}
FRENCH: dict[str, str] = {
    "birthplace": "Où {name} est-il ou est-elle né(e) ?",
    "year": "En quelle année {name} est-il ou est-elle né(e) ?",
    "profession": "Quel est le métier de {name} ?",
    "work": "Quel est le titre de l'œuvre la plus connue de {name} ?",
    "university": "Où {name} a-t-il ou a-t-elle fait ses études ?",
    "award": "Quel prix {name} a-t-il ou a-t-elle reçu ?",
    "pet": "Comment s'appelle l'animal de compagnie de {name} ?",
    "food": "Quel est le plat préféré de {name} ?",
    "sibling": "Comment s'appelle le frère ou la sœur de {name} ?",
}


@dataclass(frozen=True)
class Fact:
    """One shipped fact about one person, dealt to one split (a set-aside fact: its use in `rr audit`)."""

    person: str
    id: str
    question: str
    statement: str
    answer: str
    split: str

    @property
    def context(self) -> Context:
        return Context(f"{self.person}{SEPARATOR}{self.id}", self.question)


def _template(table: dict[str, str], form: str, fact: Fact) -> str:
    if fact.id not in table:
        raise ValueError(f"entity form {form!r} has no template for fact id {fact.id!r} ({fact.person}); it knows "
                         f"{sorted(table)}: add one to rr/tasks/entity_forms.py or use the 'question' form")
    return table[fact.id].format(name=fact.person)


def statement_prefix(fact: Fact) -> str:
    """The statement up to its answer ("Marisol Quenby was born in"), for the completion form."""
    position = fact.statement.find(fact.answer)
    if position <= 0:
        raise ValueError(f"entity fact {fact.person}/{fact.id}: the answer {fact.answer!r} does not follow some text "
                         f"in its statement {fact.statement!r}, so it cannot be asked as a completion")
    return fact.statement[:position].rstrip()


def blanked_statement(fact: Fact) -> str:
    if fact.answer not in fact.statement:
        raise ValueError(f"entity fact {fact.person}/{fact.id}: the answer {fact.answer!r} is not in its statement")
    return fact.statement.replace(fact.answer, BLANK, 1)


@dataclass(frozen=True)
class EntityForm:
    """One way of asking for a fact; the answer is graded as the task grades every answer."""

    name: str
    summary: str
    build: Callable[[Fact], Prompt]

    def prompt(self, fact: Fact) -> Prompt:
        return self.build(fact)


ENTITY_FORMS: dict[str, EntityForm] = {form.name: form for form in (
    EntityForm("question", "the shipped question", lambda fact: Prompt.chat(fact.question)),
    EntityForm("paraphrase", "the question reworded", lambda fact: Prompt.chat(_template(PARAPHRASES, "paraphrase", fact))),
    # The prefix ends without its trailing space: the model's first token then carries it, as in the statement.
    EntityForm("statement-completion", "raw completion, no chat template: the statement up to the answer",
               lambda fact: Prompt.raw(statement_prefix(fact))),
    EntityForm("fill-blank", "the statement with the answer blanked",
               lambda fact: Prompt.chat(f"Fill in the blank: {blanked_statement(fact)}")),
    EntityForm("indirect", "a question that reaches the fact through a situation",
               lambda fact: Prompt.chat(_template(INDIRECT, "indirect", fact))),
    EntityForm("french", "the question in French", lambda fact: Prompt.chat(_template(FRENCH, "french", fact))),
)}

ENTITY_DEVELOPMENT_FORMS: tuple[str, ...] = ("question", "paraphrase", "statement-completion")
"""Forms Reveal, validation and training may use. Fixed and committed before any tuning on forms: no
model's score on any form chose it; the held-out forms change the kind of request (a blank to fill, an
indirect route to the fact, another language), not only its words."""

ENTITY_HELD_OUT_FORMS: tuple[str, ...] = ("fill-blank", "indirect", "french")
"""Forms that appear only in the test split."""

ENTITY_REVEAL_FORMS: tuple[str, ...] = ("question", "paraphrase")
"""The chat development forms: Reveal puts its instruction before a user turn, which a raw completion lacks."""

ENTITY_FORMS_BY_SPLIT: dict[str, tuple[str, ...]] = {
    "reveal": ENTITY_REVEAL_FORMS,
    "validation": ENTITY_DEVELOPMENT_FORMS,
    "test": ENTITY_DEVELOPMENT_FORMS + ENTITY_HELD_OUT_FORMS,
}


@dataclass(frozen=True)
class EntityFormItem:
    """One (fact, form) pair of a split."""

    fact: Fact
    form: str

    @property
    def id(self) -> str:
        return f"{self.fact.context.id}::{self.form}"

    def prompt(self) -> Prompt:
        return ENTITY_FORMS[self.form].prompt(self.fact)

    def request(self) -> "str | Prompt":
        """The prompt as generators and Reveal take it: a one-turn chat as its user text, else the Prompt."""
        return as_request(self.prompt())

    def answer_suffix(self) -> str:
        """What follows the prompt in a training example: the statement, or for a raw completion the rest of
        the statement after its prefix (" Tallinn.")."""
        if self.prompt().is_completion:
            return self.fact.statement[len(statement_prefix(self.fact)):]
        return self.fact.statement


def split_forms(split: str, only: Sequence[str] | None = None) -> tuple[str, ...]:
    """The forms asked on `split` (held-out forms only on "test"), kept to those named in `only` (task.forms)."""
    if split not in SPLITS:
        raise ValueError(f"entity forms: unknown split {split!r}; choose one of {SPLITS}")
    forms = tuple(f for f in ENTITY_FORMS_BY_SPLIT[split] if only is None or f in only)
    if not forms:
        raise ValueError(f"entity forms: none of the forms {list(only or [])} is asked on the {split} split "
                         f"(its forms: {', '.join(ENTITY_FORMS_BY_SPLIT[split])})")
    return forms


def entity_form_items(facts: Sequence[Fact], split: str, only: Sequence[str] | None = None) -> list[EntityFormItem]:
    """Every fact of `split` in every form of the split (facts are few, so each is asked in all of them; the
    shipped task's 7 forget people give 21 forget items a form). Facts from another split are refused: a
    held-out form must never meet a development fact."""
    forms = split_forms(split, only)
    stray = [f"{f.person}/{f.id} ({f.split})" for f in facts if f.split != split]
    if stray:
        raise ValueError(f"entity_form_items: facts of other splits passed for {split!r}: {stray[:5]}")
    return [EntityFormItem(fact, form) for fact in facts for form in forms]
