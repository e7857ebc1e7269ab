"""Arithmetic word problems for the code task's utility score: generated from a seed, scored by exact match.

Items are one- and two-step problems (add, subtract, multiply) with small numbers over a dozen
templates. `generate_arithmetic_splits` draws unique questions from one seeded stream and deals
them into three splits, so the splits are disjoint by question text. Each item carries a short
worked answer ending in "The answer is N." (the retain data's phrasing).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

ARITHMETIC_SPLITS = ("train", "validation", "test")
ANSWER_INSTRUCTION = "Give the final answer as a number."


@dataclass(frozen=True)
class ArithmeticItem:
    """One word problem: its question, its integer answer and a worked answer ending "The answer is N."."""

    question: str
    answer: int
    solution: str


def arithmetic_prompt(question: str) -> str:
    """The user prompt the model answers."""
    return f"{question}\n{ANSWER_INSTRUCTION}"


def worked_answer(steps: str, answer: int) -> str:
    return f"{steps} The answer is {answer}."


_NAMES = ["Tom", "Sara", "Ben", "Lina", "Omar", "Mia", "Ravi", "Elena", "Kofi", "Hana", "Lucas", "Zoe",
          "Ivan", "Priya", "Diego", "Amara", "Jonas", "Yuki", "Noah", "Fatima", "Leo", "Grace", "Mateo", "Ines"]
# (singular, plural)
_THINGS = [("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("sticker", "stickers"),
           ("book", "books"), ("cookie", "cookies"), ("stamp", "stamps"), ("shell", "shells"),
           ("card", "cards"), ("balloon", "balloons"), ("orange", "oranges"), ("toy car", "toy cars"),
           ("crayon", "crayons"), ("button", "buttons"), ("flower", "flowers"), ("coin", "coins"),
           ("egg", "eggs"), ("ribbon", "ribbons"), ("candle", "candles"), ("puzzle", "puzzles")]
_CONTAINERS = ["box", "bag", "basket", "jar", "pack", "tray", "crate", "bucket"]
_PLURAL_CONTAINERS = {"box": "boxes", "bag": "bags", "basket": "baskets", "jar": "jars", "pack": "packs",
                      "tray": "trays", "crate": "crates", "bucket": "buckets"}


def _add(rng: random.Random) -> tuple[str, int, str]:
    name, (_, things) = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    verb = rng.choice(["buys", "finds", "is given", "collects"])
    return (f"{name} has {a} {things} and {verb} {b} more. How many {things} does {name} have now?",
            a + b, f"{name} starts with {a} {things} and gets {b} more, so {a} + {b} = {a + b}.")


def _subtract(rng: random.Random) -> tuple[str, int, str]:
    name, (_, things) = rng.choice(_NAMES), rng.choice(_THINGS)
    a = rng.randint(10, 80)
    b = rng.randint(1, a - 1)
    verb = rng.choice(["gives away", "loses", "sells", "uses"])
    return (f"{name} has {a} {things} and {verb} {b} of them. How many {things} does {name} have left?",
            a - b, f"{name} starts with {a} {things} and {verb} {b}, so {a} - {b} = {a - b}.")


def _multiply(rng: random.Random) -> tuple[str, int, str]:
    (_, things), box = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return (f"There are {a} {_PLURAL_CONTAINERS[box]} with {b} {things} in each {box}. "
            f"How many {things} are there in total?",
            a * b, f"There are {a} {_PLURAL_CONTAINERS[box]} of {b} {things}, so {a} × {b} = {a * b}.")


def _price(rng: random.Random) -> tuple[str, int, str]:
    name, (thing, things) = rng.choice(_NAMES), rng.choice(_THINGS)
    price, count = rng.randint(2, 15), rng.randint(2, 9)
    return (f"One {thing} costs ${price}. How many dollars does {name} pay for {count} {things}?",
            price * count,
            f"Each {thing} costs ${price} and {name} buys {count}, so {count} × {price} = {price * count}.")


def _difference(rng: random.Random) -> tuple[str, int, str]:
    first, second = rng.sample(_NAMES, 2)
    (_, things) = rng.choice(_THINGS)
    b = rng.randint(3, 50)
    a = b + rng.randint(1, 40)
    return (f"{first} has {a} {things} and {second} has {b} {things}. "
            f"How many more {things} does {first} have than {second}?",
            a - b, f"{first} has {a} and {second} has {b}, so {a} - {b} = {a - b}.")


def _together(rng: random.Random) -> tuple[str, int, str]:
    first, second = rng.sample(_NAMES, 2)
    (_, things) = rng.choice(_THINGS)
    a, b = rng.randint(2, 70), rng.randint(2, 70)
    return (f"{first} has {a} {things} and {second} has {b} {things}. How many {things} do they have together?",
            a + b, f"Together they have {a} + {b} = {a + b} {things}.")


def _give_then_buy(rng: random.Random) -> tuple[str, int, str]:
    name, (_, things) = rng.choice(_NAMES), rng.choice(_THINGS)
    a = rng.randint(8, 60)
    b, c = rng.randint(1, a - 1), rng.randint(2, 30)
    mid = a - b
    return (f"{name} has {a} {things}. {name} gives {b} to a friend and then buys {c} more. "
            f"How many {things} does {name} have now?",
            mid + c, f"After giving some away {name} has {a} - {b} = {mid}; after buying, {mid} + {c} = {mid + c}.")


def _groups_plus(rng: random.Random) -> tuple[str, int, str]:
    name, (_, things), box = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_CONTAINERS)
    a, b, c = rng.randint(2, 9), rng.randint(2, 10), rng.randint(1, 25)
    product = a * b
    return (f"{name} already has {c} {things} and buys {a} {_PLURAL_CONTAINERS[box]} with {b} {things} in each. "
            f"How many {things} does {name} have now?",
            product + c, f"The {_PLURAL_CONTAINERS[box]} hold {a} × {b} = {product} {things}; with the {c} "
                         f"{name} had, {product} + {c} = {product + c}.")


def _groups_minus(rng: random.Random) -> tuple[str, int, str]:
    (_, things), box = rng.choice(_THINGS), rng.choice(_CONTAINERS)
    who = rng.choice(["A baker", "A shopkeeper", "A teacher", "A farmer"])
    a, b = rng.randint(2, 9), rng.randint(3, 12)
    product = a * b
    c = rng.randint(1, product - 1)
    return (f"{who} fills {a} {_PLURAL_CONTAINERS[box]} with {b} {things} each and then hands out {c} of them. "
            f"How many {things} are left?",
            product - c,
            f"There are {a} × {b} = {product} {things}; after handing out {c}, {product} - {c} = {product - c}.")


def _sum_then_multiply(rng: random.Random) -> tuple[str, int, str]:
    (_, first_things), (_, second_things) = rng.sample(_THINGS, 2)
    people = rng.randint(2, 8)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    each = a + b
    return (f"Each of {people} children has {a} {first_things} and {b} {second_things}. "
            f"How many {first_things} and {second_things} do the children have altogether?",
            people * each, f"Each child has {a} + {b} = {each} items, so {people} × {each} = {people * each}.")


def _weekly(rng: random.Random) -> tuple[str, int, str]:
    name = rng.choice(_NAMES)
    per_day, days = rng.randint(2, 20), rng.randint(2, 7)
    activity = rng.choice([("reads", "pages"), ("walks", "blocks"), ("writes", "lines"), ("practises", "songs")])
    return (f"{name} {activity[0]} {per_day} {activity[1]} every day for {days} days. "
            f"How many {activity[1]} is that in total?",
            per_day * days, f"{per_day} {activity[1]} a day for {days} days is {per_day} × {days} = {per_day * days}.")


def _change(rng: random.Random) -> tuple[str, int, str]:
    name, (_, things) = rng.choice(_NAMES), rng.choice(_THINGS)
    price, count = rng.randint(1, 9), rng.randint(2, 6)
    cost = price * count
    paid = rng.choice([n for n in (20, 50, 100) if n > cost])
    return (f"{name} buys {count} {things} at ${price} each and pays with a ${paid} note. "
            f"How many dollars of change does {name} get?",
            paid - cost,
            f"The {things} cost {count} × {price} = {cost} dollars, so the change is {paid} - {cost} = {paid - cost}.")


def _three_add(rng: random.Random) -> tuple[str, int, str]:
    name, (_, things) = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
    return (f"{name} picked {a} {things} on Monday, {b} on Tuesday and {c} on Wednesday. "
            f"How many {things} did {name} pick in all?",
            a + b + c, f"{a} + {b} = {a + b}, and {a + b} + {c} = {a + b + c}.")


TEMPLATES: tuple[Callable[[random.Random], tuple[str, int, str]], ...] = (
    _add, _subtract, _multiply, _price, _difference, _together, _give_then_buy, _groups_plus,
    _groups_minus, _sum_then_multiply, _weekly, _change, _three_add,
)


# One arithmetic operation each: the level a 135M model answers about half the time.
ONE_STEP_TEMPLATES = (_add, _subtract, _multiply, _price)
LEVELS = {"one-step": ONE_STEP_TEMPLATES, "mixed": TEMPLATES}


def generate_arithmetic_splits(seed: int, n_per_split: int = 250, level: str = "mixed") -> dict[str, list[ArithmeticItem]]:
    """Three disjoint splits ("train", "validation", "test") of `n_per_split` unique items each.

    Deterministic in `seed`. Templates of the level ("one-step" or "mixed") are used in rotation so
    every split mixes all of them.
    """
    templates = LEVELS[level]
    if n_per_split < 1:
        raise ValueError(f"n_per_split must be ≥ 1, got {n_per_split}")
    rng = random.Random(f"rr-arithmetic-{seed}")
    needed = n_per_split * len(ARITHMETIC_SPLITS)
    seen: set[str] = set()
    items: list[ArithmeticItem] = []
    attempts = 0
    while len(items) < needed:
        attempts += 1
        if attempts > needed * 50:
            raise ValueError(f"could not draw {needed} distinct arithmetic questions; ask for fewer per split")
        template = templates[len(items) % len(templates)]
        question, answer, steps = template(rng)
        if question in seen:
            continue
        seen.add(question)
        items.append(ArithmeticItem(question, answer, worked_answer(steps, answer)))
    # Deal round-robin so that each split sees every template equally often.
    return {name: items[i::len(ARITHMETIC_SPLITS)] for i, name in enumerate(ARITHMETIC_SPLITS)}


_MARKED = re.compile(r"(?:answer\s*(?:is|:|=)|####)\s*\**\s*\$?\s*(-?\d+(?:,\d{3})*(?:\.\d+)?)", re.IGNORECASE)
# A minus sign counts only when it does not follow a word character ("5-3" is 5 and 3, not -3).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?\d+(?:,\d{3})*(?:\.\d+)?")


def extract_answer(text: str) -> Fraction | None:
    """The model's final number: the one after the last "answer is" / "####", else the last number.

    Commas in thousands and a leading "$" are ignored; "12." counts as 12. None when there is no number.
    """
    marked = _MARKED.findall(text)
    if marked:
        candidate = marked[-1]
    else:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        candidate = numbers[-1]
    candidate = candidate.replace(",", "").rstrip(".")
    try:
        return Fraction(candidate)
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(response: str, answer: int | float | Fraction) -> bool:
    """Exact match of the extracted number with the gold answer."""
    predicted = extract_answer(response)
    return predicted is not None and predicted == Fraction(answer)


def accuracy(responses: Sequence[str], answers: Sequence[int]) -> tuple[int, int]:
    """(number correct, number of items)."""
    correct = sum(is_correct(r, a) for r, a in zip(responses, answers, strict=True))
    return correct, len(answers)
