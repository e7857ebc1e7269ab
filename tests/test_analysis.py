"""Subspace similarity (Table 1) on constructed updates: identical, orthogonal and PEM-level."""

import numpy as np
import pytest
import torch

from rr.evaluation.analysis import pem_similarity, subspace_similarity
from rr.release.ledger import Pem


def test_identical_subspaces_score_the_maximum_and_orthogonal_ones_zero():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((64, 16)))[0]
    first = basis[:, :4] @ rng.standard_normal((4, 32))
    second = basis[:, 4:8] @ rng.standard_normal((4, 32))
    assert subspace_similarity(first, first, k=4) == pytest.approx(1 / np.sqrt(4))
    assert subspace_similarity(first, second, k=4) == pytest.approx(0.0, abs=1e-10)


def test_random_low_rank_updates_are_nearly_orthogonal_in_high_dimension():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 512))
    b = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 512))
    assert subspace_similarity(a, b, k=8) < 0.05


def test_pem_similarity_averages_over_shared_modules():
    torch.manual_seed(0)
    tensors = {f"model.layers.{i}.self_attn.q_proj": (torch.randn(4, 32), torch.randn(32, 4)) for i in range(3)}
    pem = Pem("f", "forget", 4, 8.0, ["q_proj"], tensors)
    same = pem_similarity(pem, pem, k=4)
    assert same["modules"] == 3 and same["mean"] == pytest.approx(0.5) and same["std"] == pytest.approx(0, abs=1e-9)
    other = Pem("r", "retain", 4, 8.0, ["q_proj"], {m: (torch.randn(4, 32), torch.randn(32, 4)) for m in tensors})
    assert pem_similarity(pem, other, k=4)["mean"] < same["mean"]
