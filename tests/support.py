"""Plain helpers the test modules share: a character tokenizer, tiny Llama models, toy forget/retain data and
an embedder. Fixtures live in conftest.py."""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rr.config import FineTuneConfig
from rr.tasks.base import Example

FORGET = [Example(f"what is {i} plus {i}?", f"it is {2 * i}.") for i in range(4)]
RETAIN = [Example(f"spell {word}", word.upper()) for word in ("cat", "dog", "sun", "tree")]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, with a two-role chat template."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "\n"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>\n{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tokenizer


def tiny_model(seed: int = 0, vocab_size: int = 128, max_positions: int = 128) -> LlamaForCausalLM:
    """A two-layer Llama (char_tokenizer's vocabulary fits), in eval mode without gradients, as rr loads models."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=max_positions))
    return model.eval().requires_grad_(False)


def learned_model(state: dict) -> LlamaForCausalLM:
    """tiny_model() with the weights of the `learned_state` fixture."""
    model = tiny_model()
    model.load_state_dict(state)
    return model


def finetune(**overrides) -> FineTuneConfig:
    """A fine-tuning config that moves a tiny model in a few steps."""
    return FineTuneConfig(**{"learning_rate": 1e-2, "batch_size": 4, "epochs": 10, **overrides})


def char_embed(texts):
    """Unit-norm character-count vectors: a deterministic stand-in for a sentence embedder."""
    vectors = np.zeros((len(texts), 128))
    for row, text in enumerate(texts):
        for ch in text:
            vectors[row, ord(ch) % 128] += 1
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
