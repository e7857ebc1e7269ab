"""The prompt type every task form renders to: chat messages (system, few-shot pairs, user turn) or a raw
completion text sent without a chat template. Torch-free and imports no other rr module (leaf layer)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    """One chat message."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role: {self.role!r} is not one of {ROLES}")
        if not isinstance(self.content, str):
            raise TypeError(f"Turn.content of a {self.role} turn must be a str, got {type(self.content).__name__}")


@dataclass(frozen=True)
class Prompt:
    """What a model is asked: exactly one of `messages` (a chat) or `completion` (raw text to continue).

    A chat is an optional system turn, then user/assistant turns alternating, ending with a user turn
    (the few-shot pairs are the earlier user/assistant turns). A completion is rendered as is: no chat
    template, no generation prompt, so the model continues the text (e.g. a function signature).
    """

    messages: tuple[Turn, ...] = ()
    completion: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.messages, tuple):
            # A list would make a "frozen" prompt mutable and unhashable; convert once, here.
            object.__setattr__(self, "messages", tuple(self.messages))
        if (self.completion is None) == (not self.messages):
            raise ValueError("Prompt: give exactly one of messages (a chat) or completion (raw text); "
                             f"got {len(self.messages)} messages and completion={self.completion!r:.40}")
        if self.completion is not None:
            if not isinstance(self.completion, str) or not self.completion:
                raise ValueError("Prompt.completion must be a non-empty str")
            return
        turns = list(self.messages)
        if not all(isinstance(t, Turn) for t in turns):
            raise TypeError("Prompt.messages must hold Turn objects; build chats with Prompt.chat(...)")
        if turns[0].role == "system":
            turns = turns[1:]
        for index, turn in enumerate(turns):
            expected = "user" if index % 2 == 0 else "assistant"
            if turn.role != expected:
                raise ValueError(f"Prompt.messages: turn {index + (len(self.messages) - len(turns))} is a "
                                 f"{turn.role!r} turn, expected {expected!r} (an optional system turn first, then "
                                 "user/assistant alternating)")
        if not turns or turns[-1].role != "user":
            raise ValueError("Prompt.messages must end with a user turn (the one the model answers)")

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def chat(cls, user: str, system: str | None = None,
             shots: Iterable[tuple[str, str]] = ()) -> "Prompt":
        """A chat: optional system turn, few-shot (user, assistant) pairs, then the user turn to answer."""
        turns = [Turn("system", system)] if system is not None else []
        for shot_user, shot_assistant in shots:
            turns += [Turn("user", shot_user), Turn("assistant", shot_assistant)]
        turns.append(Turn("user", user))
        return cls(messages=tuple(turns))

    @classmethod
    def raw(cls, text: str) -> "Prompt":
        """A raw completion: `text` is what the model continues, with no chat template."""
        return cls(completion=text)

    def with_user(self, text: str) -> "Prompt":
        """The same chat with its last user turn replaced by `text` (e.g. an instruction put before it)."""
        if self.completion is not None:
            raise ValueError("Prompt.with_user: a raw completion has no user turn")
        return Prompt(messages=self.messages[:-1] + (Turn("user", text),))

    # ---- reading ----------------------------------------------------------------------------

    @property
    def is_completion(self) -> bool:
        return self.completion is not None

    @property
    def system(self) -> str | None:
        return self.messages[0].content if self.messages and self.messages[0].role == "system" else None

    @property
    def user(self) -> str:
        """The text the model answers: the last user turn, or the completion text."""
        return self.completion if self.completion is not None else self.messages[-1].content

    def message_dicts(self) -> list[dict[str, str]]:
        """The chat as HF/OpenAI-style message dicts ([] for a completion)."""
        return [{"role": t.role, "content": t.content} for t in self.messages]

    def render(self, tokenizer) -> str:
        """The text to tokenize: the chat template with the generation prompt for a chat, the text
        itself for a completion (after the BOS token where the tokenizer puts one before plain text, as
        Llama and Mistral do and chat templates write themselves; rr tokenizes rendered text without
        adding special tokens). A tokenizer without a chat template gets the turns' texts joined by
        blank lines and a newline, which for a single user turn is what rr's HF generator sends."""
        if self.completion is not None:
            bos = _plain_text_bos(tokenizer)
            return self.completion if self.completion.startswith(bos) else bos + self.completion
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(self.message_dicts(), tokenize=False, add_generation_prompt=True)
        return "\n\n".join(t.content for t in self.messages) + "\n"

    # ---- identity: caching and seeding --------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict that from_json reads back to an equal Prompt."""
        if self.completion is not None:
            return {"completion": self.completion}
        return {"messages": self.message_dicts()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Prompt":
        if not isinstance(data, Mapping) or set(data) not in ({"completion"}, {"messages"}):
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"Prompt.from_json: expected an object with exactly one key, 'messages' or "
                             f"'completion'; got {keys}")
        if "completion" in data:
            return cls(completion=data["completion"])
        messages: Sequence[Mapping[str, Any]] = data["messages"]
        if not isinstance(messages, (list, tuple)):
            raise ValueError("Prompt.from_json: 'messages' must be a list of {role, content} objects")
        turns = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
                raise ValueError(f"Prompt.from_json: message {index} must be an object with exactly 'role' "
                                 f"and 'content'")
            turns.append(Turn(message["role"], message["content"]))
        return cls(messages=tuple(turns))

    def key(self) -> str:
        """A stable hex digest of the prompt's content (same prompt, same key, across processes and
        versions of Python), for cache keys and request seeds. A chat and a completion with the same
        text have different keys."""
        canonical = json.dumps(self.to_json(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _plain_text_bos(tokenizer) -> str:
    """The BOS token's text if `tokenizer` starts plain text with it by default, else ""."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None:
        return ""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos_id else ""


def as_prompt(prompt: "str | Prompt", system: str | None = None) -> Prompt:
    """A generator's input as a Prompt: a str is one user turn (after `system`, when given); a Prompt is
    used as it is (its own system turn, shots or raw completion win over the generator's default)."""
    if isinstance(prompt, Prompt):
        return prompt
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a str (one user turn) or a Prompt, got {type(prompt).__name__}")
    return Prompt.chat(prompt, system=system or None)


def as_request(prompt: Prompt) -> "str | Prompt":
    """as_prompt's inverse where it loses nothing: a one-turn chat as its user text (how the tasks ask their
    questions and Reveal puts its instruction before them), anything else as the Prompt."""
    return prompt.user if not prompt.is_completion and len(prompt.messages) == 1 else prompt


def prompt_to_json(prompt: "str | Prompt") -> "str | dict[str, Any]":
    """A prompt as stored in JSON (forget records): a str stays a str; a Prompt becomes Prompt.to_json()."""
    return prompt.to_json() if isinstance(prompt, Prompt) else prompt


def prompt_from_json(value: Any) -> "str | Prompt":
    """prompt_to_json's inverse; ValueError names what is wrong with anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return Prompt.from_json(value)
    raise ValueError(f"a stored prompt must be a string or a {{messages|completion}} object, got {type(value).__name__}")
