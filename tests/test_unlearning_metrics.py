"""Unlearning metrics (rr/evaluation/memorization.py) on hand-checked inputs, and on a tiny model."""

import math

import numpy as np
import pytest
import torch
from support import char_tokenizer, tiny_model

from rr.evaluation.memorization import (answer_probability, bleu, embedding_cosine, extraction_likelihood,
                                        forget_efficacy, memorization_accuracy, model_extraction_likelihood,
                                        model_utility, overlap_n, rouge_l_recall, teacher_forced_scores,
                                        token_entropy)
from rr.core.tokens import IGNORE_INDEX
from rr.tasks.base import Example

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rouge_l_recall_counts_the_longest_common_subsequence_of_reference_words():
    assert rouge_l_recall("She was born in Tallinn, Estonia.", "Tallinn") == 1.0
    # reference a b c d; prediction has a, c, d in order (b missing): LCS 3 of 4
    assert rouge_l_recall("A x C d", "a b c d") == pytest.approx(3 / 4)
    assert rouge_l_recall("d c b a", "a b c d") == pytest.approx(1 / 4)  # order matters
    assert rouge_l_recall("anything", "") == 0.0 and rouge_l_recall("", "a b") == 0.0


def test_bleu_is_one_for_an_exact_match_and_smoothed_otherwise():
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    # 1 of 2 unigrams match, no bigram/trigram/4-gram (ε = 0.1; shorter n-grams than 3/4 tokens count ε too),
    # brevity penalty exp(1 − 4/2)
    expected = math.exp(1 - 4 / 2) * math.exp((math.log(0.5) + math.log(0.1 / 1) + math.log(0.1) + math.log(0.1)) / 4)
    assert bleu("cat dog", "the cat sat down", epsilon=0.1) == pytest.approx(expected)
    assert bleu("", "a") == 0.0
    assert bleu("completely unrelated words here", "the cat sat on the mat") < 0.01


def test_token_entropy_is_normalized_to_the_output_length():
    assert token_entropy([1, 2, 3, 4]) == pytest.approx(1.0)
    assert token_entropy([7, 7, 7, 7]) == 0.0
    # counts 2, 1, 1 of 4: H = −(½ ln ½ + 2·¼ ln ¼) = 1.5 ln 2; / ln 4 = 0.75
    assert token_entropy(["a", "a", "b", "c"]) == pytest.approx(0.75)
    assert token_entropy([1]) == 0.0


def test_extraction_likelihood_matches_papers_003_eq_7_by_hand():
    target = [1, 2, 3, 4, 5]  # T = 5, n = 2: prefixes of 1, 2, 3 tokens
    assert overlap_n([2, 3, 9], [2, 3, 4, 5], 2) == pytest.approx(1 / 2)  # bigrams (2,3) ✓, (3,9) ✗
    continuations = [[2, 3, 4, 5], [9, 9, 9], [4, 5]]
    # prefix [1] → suffix 2 3 4 5: all 3 bigrams found; [1 2] → 3 4 5: none; [1 2 3] → 4 5: 1 of 1
    assert extraction_likelihood(target, continuations, 2) == pytest.approx((1 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="needs 3 continuations"):
        extraction_likelihood(target, continuations[:2], 2)
    with pytest.raises(ValueError, match="longer than 5"):
        extraction_likelihood(target, [], 5)


def test_answer_probability_and_memorization_accuracy_on_worked_logits():
    # Row: label 1 at position 1 scored by logits 0 (p = [¼, ¾]); label 0 at position 2 scored by logits 1
    # (p = [½, ½], argmax ties to index 0 → a hit); position 0's label is ignored.
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 1, 0]])
    assert answer_probability(logits, labels).tolist() == pytest.approx([(0.75 + 0.5) / 2])
    assert memorization_accuracy(logits, labels).tolist() == pytest.approx([1.0])
    labels_wrong = torch.tensor([[IGNORE_INDEX, 0, 1]])  # p = ¼ (miss), ½ (argmax is 0: miss)
    assert answer_probability(logits, labels_wrong).tolist() == pytest.approx([(0.25 + 0.5) / 2])
    assert memorization_accuracy(logits, labels_wrong).tolist() == pytest.approx([0.0])


def test_mu_is_a_harmonic_mean_and_fe_one_minus_a_mean():
    assert model_utility([0.5, 1.0]) == pytest.approx(2 / (2 + 1))
    assert model_utility([0.9, 0.0, 1.0]) == 0.0  # any metric at zero sinks MU
    assert forget_efficacy([0.2, 0.4]) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        model_utility([])


def test_embedding_cosine_uses_the_given_embedder():
    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8]}
    embed = lambda texts: np.array([table[t] for t in texts])  # noqa: E731
    assert embedding_cosine(embed, ["a", "c"], ["a", "b"]) == pytest.approx([1.0, 0.8])


def test_model_helpers_on_a_tiny_model():
    tokenizer, model = char_tokenizer(), tiny_model()
    scores = teacher_forced_scores(model, tokenizer, [Example("hi", "abc"), Example("yo", "z")])
    assert len(scores["answer_probability"]) == 2
    # an untrained 128-token model: probabilities near 1/128, MA in [0, 1]
    assert all(0 < p < 0.05 for p in scores["answer_probability"])
    assert all(0 <= a <= 1 for a in scores["memorization_accuracy"])
    # a sequence the model continues exactly: its own greedy output
    from rr.evaluation.memorization import greedy_continuation

    own = [5] + greedy_continuation(model, [5], 7)  # greedy: every prefix continues as the sequence does
    assert model_extraction_likelihood(model, own, n=2) == pytest.approx(1.0)
