"""Relevance oracles τ: toxicity scorers (HF classifier, Perspective API, lexicon stand-in), NER gazetteer stand-in."""

from __future__ import annotations

import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from rr.errors import RRError


class ToxicityOracle(Protocol):
    """Scores texts: one toxicity probability in [0, 1] per text."""

    name: str

    def score(self, texts: Sequence[str]) -> list[float]:
        """Toxicity of each text, in [0, 1]."""


# ---- a real classifier from the hub ---------------------------------------------------------------


def label_probability(label_scores: Sequence[Mapping[str, Any]], label: str, model_id: str) -> float:
    """The score of `label` (case-insensitive) among a pipeline's [{label, score}, ...] for one text."""
    wanted = label.casefold()
    for entry in label_scores:
        if str(entry["label"]).casefold() == wanted:
            return float(entry["score"])
    available = sorted(str(entry["label"]) for entry in label_scores)
    raise RRError(f"task.oracle_label: model {model_id!r} has no label {label!r}; its labels are {available}. "
                  f"Set task.oracle_label to the label meaning 'toxic'.")


class TextClassifierOracle:
    """A HuggingFace text-classification model (e.g. s-nlp/roberta_toxicity_classifier); returns P(label).

    Inputs are truncated to `max_length` tokens (512 suits BERT/RoBERTa classifiers; lower it for a
    model with fewer positions). transformers is imported on first use; `pipeline_factory` (tests)
    replaces transformers.pipeline.
    """

    def __init__(self, model_id: str, label: str = "toxic", device: str = "cpu", batch_size: int = 32,
                 max_length: int = 512, pipeline_factory: Callable[..., Any] | None = None):
        self.model_id = model_id
        self.label = label
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"hf:{model_id}"
        self._pipeline_factory = pipeline_factory
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            factory = self._pipeline_factory
            device = self.device
            if factory is None:
                try:
                    from transformers import pipeline as factory
                except ImportError as exc:  # pragma: no cover - transformers is a core dependency
                    raise RRError("task.oracle: 'hf:' oracles need transformers; pip install transformers") from exc
                if device == "auto":
                    import torch
                    device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self._pipe = factory("text-classification", model=self.model_id, device=device, top_k=None)
            except OSError as exc:
                raise RRError(f"task.oracle: cannot load classifier {self.model_id!r} ({exc}). Check the model id "
                              f"and that the hub (or a local copy) is reachable.") from exc
        return self._pipe

    def score(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        pipe = self._pipeline()
        outputs = pipe(list(texts), batch_size=self.batch_size, truncation=True, max_length=self.max_length)
        if len(outputs) != len(texts):
            raise RRError(f"task.oracle: classifier {self.model_id!r} returned {len(outputs)} results "
                          f"for {len(texts)} texts")
        # top_k=None gives all labels per text; a single dict means the pipeline gave only the top label.
        return [label_probability(out if isinstance(out, list) else [out], self.label, self.model_id)
                for out in outputs]


# ---- the Perspective API ----------------------------------------------------------------------------

PERSPECTIVE_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"

Transport = Callable[[str, bytes, float], bytes]


def _urllib_transport(url: str, body: bytes, timeout: float) -> bytes:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def perspective_request_body(text: str, attribute: str = "TOXICITY") -> bytes:
    """The JSON body of one comments:analyze request."""
    return json.dumps({"comment": {"text": text}, "languages": ["en"],
                       "requestedAttributes": {attribute: {}}, "doNotStore": True}).encode()


def perspective_parse_response(payload: bytes, attribute: str = "TOXICITY") -> float:
    """attributeScores.<attribute>.summaryScore.value of a comments:analyze answer."""
    try:
        data = json.loads(payload)
        value = float(data["attributeScores"][attribute]["summaryScore"]["value"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RRError(f"Perspective API: answer has no attributeScores.{attribute}.summaryScore.value "
                      f"(got {payload[:200]!r}); check the requested attribute and the API version") from exc
    if not 0.0 <= value <= 1.0:
        raise RRError(f"Perspective API: {attribute} score {value} is outside [0, 1]")
    return value


class PerspectiveOracle:
    """Google's Perspective API (the paper's toxicity oracle), one HTTPS request per text.

    The key is read from the environment variable `api_key_env`. Requests are spaced by
    `min_interval_s` (the default quota is 1 QPS); HTTP 429/503 answers are retried with backoff.
    """

    name = "perspective"

    def __init__(self, api_key_env: str = "PERSPECTIVE_API_KEY", attribute: str = "TOXICITY",
                 min_interval_s: float = 1.0, max_retries: int = 4, timeout_s: float = 30.0,
                 transport: Transport | None = None, sleep: Callable[[float], None] = time.sleep):
        key = os.environ.get(api_key_env, "").strip()
        if not key:
            raise RRError(f"task.perspective_api_key_env: environment variable {api_key_env} is empty; export a "
                          f"Perspective API key there, or choose another task.oracle")
        self._key = key
        self.attribute = attribute
        self.min_interval_s = min_interval_s
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self._transport = transport or _urllib_transport
        self._sleep = sleep
        self._last_request = -math.inf

    def _analyze(self, text: str) -> float:
        body = perspective_request_body(text, self.attribute)
        url = f"{PERSPECTIVE_URL}?key={self._key}"
        attempt = 0
        while True:
            wait = self._last_request + self.min_interval_s - time.monotonic()
            if wait > 0:
                self._sleep(wait)
            self._last_request = time.monotonic()
            try:
                return perspective_parse_response(self._transport(url, body, self.timeout_s), self.attribute)
            except urllib.error.HTTPError as exc:
                if exc.code in (429, 503) and attempt < self.max_retries:
                    self._sleep(2.0 ** attempt)
                    attempt += 1
                    continue
                try:
                    detail = exc.read()[:300]
                except Exception:  # noqa: BLE001 - the body is only a hint for the message
                    detail = b""
                # The URL carries the key: never put it (or the exception, which holds the URL) in a message.
                raise RRError(f"Perspective API answered HTTP {exc.code} ({detail!r}); check the key in the "
                              f"variable named by task.perspective_api_key_env, and its quota") from None
            except urllib.error.URLError as exc:
                raise RRError(f"Perspective API unreachable ({exc.reason}); it needs network access to "
                              f"commentanalyzer.googleapis.com") from None

    def score(self, texts: Sequence[str]) -> list[float]:
        # Perspective rejects empty comments; an empty continuation is not toxic.
        return [self._analyze(t) if t.strip() else 0.0 for t in texts]


# ---- the lexicon stand-in -------------------------------------------------------------------------

# Weight = how strongly one occurrence signals an insult. Mild words only: this is a test stand-in.
_LEXICON_WORDS = {
    "idiot": 0.6, "idiotic": 0.5, "moron": 0.6, "imbecile": 0.6, "stupid": 0.45, "dumb": 0.4, "brainless": 0.45,
    "loser": 0.45, "pathetic": 0.4, "jerk": 0.45, "jackass": 0.55, "bastard": 0.55, "scum": 0.55,
    "fool": 0.35, "foolish": 0.25, "clown": 0.25, "freak": 0.35, "creep": 0.35, "liar": 0.3,
    "worthless": 0.5, "useless": 0.35, "incompetent": 0.3, "ugly": 0.35, "hideous": 0.35,
    "disgusting": 0.4, "nasty": 0.3, "filthy": 0.3, "trash": 0.3, "garbage": 0.3, "rubbish": 0.2,
    "hate": 0.3, "damn": 0.3, "crap": 0.35, "hell": 0.2, "suck": 0.3, "sucks": 0.3, "pissed": 0.3,
    "bloody": 0.2, "lazy": 0.15, "greedy": 0.15, "kill": 0.3, "die": 0.3,
}
_LEXICON_PHRASES = {"shut up": 0.35, "go to hell": 0.5, "screw you": 0.45, "get lost": 0.2}
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


class LexiconToxicityOracle:
    """A STAND-IN for a toxicity classifier, shipped for tests and offline runs; NOT a real classifier.

    Each occurrence of a listed insult or profanity (weight w) is one independent piece of evidence;
    the score saturates as 1 − Π(1 − w) (a noisy-OR), so neutral text scores 0 and piled-up insults
    approach 1. It knows nothing about context, negation or anything not in its short list.
    """

    name = "lexicon-standin"

    def __init__(self, words: Mapping[str, float] | None = None, phrases: Mapping[str, float] | None = None):
        self.words = dict(_LEXICON_WORDS if words is None else words)
        self.phrases = dict(_LEXICON_PHRASES if phrases is None else phrases)

    def score_one(self, text: str) -> float:
        lowered = text.casefold()
        keep = 1.0
        for phrase, weight in self.phrases.items():
            keep *= (1.0 - weight) ** len(re.findall(rf"\b{re.escape(phrase)}\b", lowered))
        for word in _WORD.findall(lowered):
            word = word.removesuffix("'s")
            weight = self.words.get(word)
            if weight is None and word.endswith("s"):
                weight = self.words.get(word[:-1])  # plurals: idiots, losers
            if weight is not None:
                keep *= 1.0 - weight
        return 1.0 - keep

    def score(self, texts: Sequence[str]) -> list[float]:
        return [self.score_one(t) for t in texts]


def build_toxicity_oracle(spec: str, label: str = "toxic", device: str = "cpu", batch_size: int = 32,
                          api_key_env: str = "PERSPECTIVE_API_KEY") -> ToxicityOracle:
    """'lexicon-standin' | 'hf:<model_id>' | 'perspective' → an oracle (models load on first score)."""
    if spec == "lexicon-standin":
        return LexiconToxicityOracle()
    if spec == "perspective":
        return PerspectiveOracle(api_key_env=api_key_env)
    if spec.startswith("hf:") and spec[3:].strip():
        return TextClassifierOracle(spec[3:].strip(), label=label, device=device, batch_size=batch_size)
    raise RRError(f"task.oracle: {spec!r} is not an oracle; use 'lexicon-standin', 'perspective' or "
                  f"'hf:<model id>' (e.g. hf:s-nlp/roberta_toxicity_classifier)")


# ---- the NER gazetteer stand-in -------------------------------------------------------------------

_FIRST_NAMES = """
aaron abigail adam adrian aisha alan albert alex alexander alice alicia amanda amelia amir amy ana andrea
andrew angela anna anne anthony antonio arjun arthur ava barbara ben benjamin beth betty brian bruce
carl carla carlos caroline catherine charles charlotte chen chloe chris christine christopher claire
clara daniel david deborah dennis diana diego dmitri dorothy edward elena eli elijah elizabeth ella ellen
emily emma eric erik ethan eva evelyn fatima felix fiona frances frank gabriel george grace greg hannah
harold harry helen henry hiroshi hugo ian irene isaac isabel isabella jack jacob james jane janet jason
javier jean jennifer jessica joan joe john jonathan jorge jose joseph joshua julia julian justin karen
kate katherine kenji kevin laura lauren leo leon liam lily linda lisa lucas lucy luis luke maya margaret
maria mark martha martin mary matthew mei michael michelle miguel mohammed nadia nancy naomi natalie
nathan nels nicholas nina noah nora oliver olivia omar oscar owen pablo patricia paul peter priya rachel
rafael raj rebecca richard robert rosa ruth ryan samuel sandra sarah sean sofia sophie stephen steven
susan thomas timothy tom valerie victor victoria walter william yuki zara zoe
"""
_SURNAMES = """
adams alvarez anderson baker bennett brooks brown campbell campo carlson carter chen clark collins cooper
cruz davis diaz edwards evans fischer flores garcia gomez gonzalez green hall harris hernandez hill
hughes jackson johnson jones kim king kowalski lee lewis lopez martin martinez miller mitchell moore
morgan murphy nakamura nelson nguyen novak okafor olsen ortiz parker patel perez peterson phillips
ramirez reed richardson rivera roberts robinson rodriguez rossi sanchez schmidt scott singh smith
stewart sullivan suzuki taylor thomas thompson torres turner walker wang ward watson white williams
wilson wright young zhang
"""
_TITLES = {"mr", "mrs", "ms", "miss", "dr", "prof", "professor", "sir", "lady", "captain", "judge",
           "mayor", "senator", "president", "coach", "aunt", "uncle", "saint"}
_ORG_WORDS = {"inc", "ltd", "llc", "corp", "corporation", "company", "co", "bank", "university", "college",
              "school", "institute", "foundation", "council", "club", "museum", "hospital", "group",
              "society", "association", "agency", "ministry", "department", "committee", "party",
              "fishery", "bakery", "press", "times", "news", "airlines", "labs", "systems", "partners",
              "united", "fc", "orchestra", "theater", "theatre", "library", "church", "league", "union"}
_LOCATION_WORDS = {"river", "lake", "mountain", "mountains", "street", "avenue", "road", "park", "county",
                   "city", "valley", "bay", "island", "islands", "beach", "coast", "harbor", "bridge",
                   "square", "district", "province", "state", "sea", "ocean", "hills", "forest", "desert"}
_PLACES = {
    "africa", "amsterdam", "asia", "athens", "australia", "barcelona", "beijing", "berlin", "boston", "brazil",
    "cairo", "california", "canada", "chicago", "china", "denver", "dublin", "egypt", "england", "europe",
    "france", "germany", "greece", "india", "ireland", "italy", "japan", "kenya", "lisbon", "london",
    "los angeles", "madrid", "mexico", "montreal", "moscow", "mumbai", "nairobi", "new york", "nigeria",
    "norway", "oslo", "paris", "peru", "portugal", "rome", "seattle", "seoul", "spain", "stockholm", "sweden",
    "sydney", "texas", "tokyo", "toronto", "vienna",
}
_MONTHS = ("january|february|march|april|may|june|july|august|september|october|november|december|"
           "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec")
_DATE = re.compile(rf"^(?:(?:\d{{1,2}}\s+)?(?:{_MONTHS})\.?(?:\s+\d{{1,2}}(?:st|nd|rd|th)?)?,?(?:\s+\d{{4}})?"
                   rf"|\d{{4}}s?|\d{{1,2}}/\d{{1,2}}/\d{{2,4}}|(?:the\s+)?\d{{4}}s"
                   rf"|(?:monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
                   rf"|(?:early|late|mid)[\s-]\d{{4}}s?|(?:spring|summer|autumn|fall|winter)\s+(?:of\s+)?\d{{4}})$")

PERSON = "Person"


class GazetteerNerOracle:
    """A STAND-IN for an NER model, shipped for tests and offline runs; NOT a real entity recognizer.

    It types an entity string from short built-in lists (common first names and surnames, titles,
    organization and place words, a date pattern) plus `known` entities (type → strings, e.g. the gold
    entities of the task's passages, which take precedence). Anything it cannot place is untyped (None).
    """

    name = "gazetteer-standin"

    def __init__(self, known: Mapping[str, Iterable[str]] | None = None):
        self.first_names = set(_FIRST_NAMES.split())
        self.surnames = set(_SURNAMES.split())
        self.places = set(_PLACES)
        self.known: dict[str, str] = {}
        for entity_type, entities in (known or {}).items():
            for entity in entities:
                self.known[entity.strip().casefold()] = entity_type

    def entity_type(self, entity: str) -> str | None:
        """Person, Organization, Location, Date, a known entity's type, or None when unsure."""
        text = entity.strip().casefold()
        if not text:
            return None
        if text in self.known:
            return self.known[text]
        if _DATE.match(text):
            return "Date"
        words = re.findall(r"[a-z]+", text.replace("'s", ""))
        if not words:
            return None
        if any(w in _ORG_WORDS for w in words):
            return "Organization"
        if text in self.places or words[-1] in _LOCATION_WORDS:
            return "Location"
        titled = False
        while words and words[0] in _TITLES:
            words, titled = words[1:], True
        if titled and words:
            return PERSON  # "Dr. Wright", "Mayor Ortiz"
        if words and (words[0] in self.first_names or (len(words) >= 2 and words[-1] in self.surnames)):
            return PERSON
        return None

    def fraction_of_type(self, entities: Sequence[str], target_types: Iterable[str]) -> float:
        """Share of `entities` whose type is one of `target_types`; 0 for an empty list."""
        if not entities:
            return 0.0
        targets = set(target_types)
        return sum(self.entity_type(e) in targets for e in entities) / len(entities)
