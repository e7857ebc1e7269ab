"""Vendi score: its extremes, dual == primal, and the running Gram of D_self-gen."""

import numpy as np
import pytest

from rr.reveal.diversity import RunningGram, normalized_gram, vendi_from_gram, vendi_score


def primal_vendi(embeddings: np.ndarray) -> float:
    """The definition, spelled out: eigenvalues of K/n with K the n×n cosine-similarity matrix."""
    rows = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    eigenvalues = np.linalg.eigvalsh(rows @ rows.T / len(rows))
    eigenvalues = eigenvalues[eigenvalues > 1e-15]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def test_identical_items_score_one():
    row = np.random.default_rng(0).standard_normal(16)
    assert vendi_score(np.tile(row, (5, 1))) == pytest.approx(1.0, abs=1e-9)       # n ≤ d: primal
    assert vendi_score(np.tile(row, (50, 1))) == pytest.approx(1.0, abs=1e-9)      # n > d: dual


def test_orthogonal_items_score_n_whatever_their_norms():
    scales = np.arange(1, 9, dtype=float)[:, None]
    assert vendi_score(np.eye(8) * scales) == pytest.approx(8.0, rel=1e-12)
    assert vendi_score(np.eye(12)[:5] * 3.0) == pytest.approx(5.0, rel=1e-12)


def test_repeated_orthogonal_groups_count_the_groups():
    # 30 items in 3 orthogonal directions: Vendi is the effective number of distinct items, 3.
    items = np.repeat(np.eye(5)[:3], 10, axis=0)
    assert vendi_score(items) == pytest.approx(3.0, rel=1e-12)


@pytest.mark.parametrize("n, dim", [(40, 30), (30, 40), (150, 8)])
def test_score_matches_the_primal_definition(n, dim):
    embeddings = np.random.default_rng(n).standard_normal((n, dim))
    assert vendi_score(embeddings) == pytest.approx(primal_vendi(embeddings), rel=1e-10)


def test_dual_gram_gives_the_primal_score_and_chunks_add_up():
    # More rows than one chunk, so the blockwise float64 accumulation is exercised.
    embeddings = np.random.default_rng(1).standard_normal((9000, 12))
    rows = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(normalized_gram(embeddings), rows.T @ rows, rtol=1e-10, atol=1e-9)
    assert vendi_from_gram(normalized_gram(embeddings[:120]), 120) == pytest.approx(primal_vendi(embeddings[:120]),
                                                                                  rel=1e-10)


def test_float32_input_agrees_with_float64():
    embeddings = np.random.default_rng(2).standard_normal((5000, 64))
    assert vendi_score(embeddings.astype(np.float32)) == pytest.approx(vendi_score(embeddings), rel=1e-5)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="row 1"):
        vendi_score(np.array([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match="2-D"):
        vendi_score(np.ones(3))
    with pytest.raises(ValueError, match="at least one"):
        vendi_score(np.ones((0, 3)))


def test_running_gram_scores_the_union_without_changing_itself():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((n, 24)).astype(np.float32) for n in (10, 7, 40)]
    running = RunningGram(24)
    for batch in batches:
        running.add(batch)
    new = rng.standard_normal((6, 24))
    everything = np.concatenate(batches + [new])

    before = running.state_dict()
    assert running.vendi_with(new) == pytest.approx(vendi_score(everything), rel=1e-6)
    assert running.normalized_diversity_with(new) == pytest.approx(vendi_score(everything) / len(everything), rel=1e-6)
    assert 0 < running.normalized_diversity_with(new) <= 1
    assert running.count == 57 and np.array_equal(running.gram, before["gram"])
    assert running.vendi() == pytest.approx(vendi_score(np.concatenate(batches)), rel=1e-6)


def test_empty_running_gram_scores_the_new_items_alone():
    new = np.random.default_rng(4).standard_normal((5, 10))
    assert RunningGram(10).vendi_with(new) == pytest.approx(vendi_score(new), rel=1e-10)


def test_running_gram_state_round_trip():
    rng = np.random.default_rng(5)
    running = RunningGram(16)
    running.add(rng.standard_normal((20, 16)))
    restored = RunningGram.from_state_dict(running.state_dict())
    new = rng.standard_normal((4, 16))
    assert restored.count == running.count
    assert restored.vendi_with(new) == running.vendi_with(new)
    restored.add(new)
    assert restored.count == 24 and running.count == 20  # the restored copy shares no buffers


def test_running_gram_rejects_another_embedder():
    with pytest.raises(ValueError, match="same embedder"):
        RunningGram(8).add(np.ones((2, 9)))
    with pytest.raises(ValueError, match="different embedder"):
        RunningGram.from_state_dict({"dim": 8, "count": 1, "gram": np.eye(9)})
