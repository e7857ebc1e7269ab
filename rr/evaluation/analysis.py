"""Subspace similarity of two PEMs (papers/000 §4.1, Table 1): do retain and forget updates overlap?"""

from __future__ import annotations

import numpy as np


def subspace_similarity(update_a: np.ndarray, update_b: np.ndarray, k: int = 8) -> float:
    """Sim(U1, U2) = ‖U1ᵀ U2‖_F / k over the top-k left singular vectors of two weight updates.

    This is the paper's formula as printed (so values match its Table 1). With orthonormal U's the
    Frobenius norm is at most √k, so the score lies in [0, 1/√k]; near 0 means orthogonal subspaces.
    """
    if update_a.shape[0] != update_b.shape[0]:
        raise ValueError(f"updates have different output sizes: {update_a.shape} vs {update_b.shape}")
    k = min(k, *update_a.shape, *update_b.shape)
    left_a = np.linalg.svd(update_a, full_matrices=False)[0][:, :k]
    left_b = np.linalg.svd(update_b, full_matrices=False)[0][:, :k]
    return float(np.linalg.norm(left_a.T @ left_b) / k)


def pem_similarity(pem_a, pem_b, k: int = 8) -> dict:
    """Mean and standard deviation over the shared target modules of W = (α/r)·B·A of each PEM."""
    shared = sorted(set(pem_a.tensors) & set(pem_b.tensors))
    if not shared:
        raise ValueError(f"PEMs {pem_a.name} and {pem_b.name} share no target module")
    values = []
    for module in shared:
        (a1, b1), (a2, b2) = pem_a.tensors[module], pem_b.tensors[module]
        w1 = (b1.double() @ a1.double()).numpy() * pem_a.scaling
        w2 = (b2.double() @ a2.double()).numpy() * pem_b.scaling
        values.append(subspace_similarity(w1, w2, k))
    return {"pem_a": pem_a.name, "pem_b": pem_b.name, "k": k, "modules": len(values),
            "mean": float(np.mean(values)), "std": float(np.std(values))}
