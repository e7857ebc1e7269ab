"""Vendi diversity of response embeddings, and a running Gram matrix of D_self-gen so arms are scored cheaply."""

from __future__ import annotations

import numpy as np

# Rows are normalized and multiplied in blocks of this many: each block's XᵀX runs in the input's
# precision through BLAS (fast), and the blocks are summed in float64 (accurate over 10⁵+ rows).
_CHUNK_ROWS = 4096


def _as_matrix(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    matrix = np.asarray(embeddings)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_items, dim); got shape {matrix.shape}")
    if matrix.dtype not in (np.float32, np.float64):
        matrix = matrix.astype(np.float64)
    return matrix


def _normalized(block: np.ndarray) -> np.ndarray:
    squared_norms = np.einsum("ij,ij->i", block, block)
    if not np.all(squared_norms > 0) or not np.all(np.isfinite(squared_norms)):
        bad = int(np.flatnonzero(~(squared_norms > 0) | ~np.isfinite(squared_norms))[0])
        raise ValueError(f"embedding row {bad} is zero or not finite; cosine similarity needs a non-zero, "
                         "finite vector for every item (check the embedder's output)")
    return block * (1.0 / np.sqrt(squared_norms))[:, None]


def normalized_gram(embeddings: np.ndarray) -> np.ndarray:
    """XᵀX (d×d, float64) of the L2-normalized rows: the dual form of the cosine-similarity kernel."""
    matrix = _as_matrix(embeddings)
    gram = np.zeros((matrix.shape[1], matrix.shape[1]), dtype=np.float64)
    for start in range(0, matrix.shape[0], _CHUNK_ROWS):
        block = _normalized(matrix[start:start + _CHUNK_ROWS])
        gram += block.T @ block  # numpy routes Xᵀ·X of one buffer to BLAS syrk
    return gram


def _entropy_exp(eigenvalues: np.ndarray) -> float:
    # eigvalsh returns tiny negatives for a rank-deficient kernel; those and exact zeros carry no mass.
    positive = eigenvalues[eigenvalues > 0]
    positive = positive / positive.sum()  # the trace is 1 in exact arithmetic; renormalize rounding away
    return float(np.exp(-np.sum(positive * np.log(positive))))


def vendi_from_gram(gram: np.ndarray, n: int) -> float:
    """Vendi score from a precomputed XᵀX of n L2-normalized rows.

    XᵀX/n and K/n = XXᵀ/n share their non-zero eigenvalues, so v = exp(−Σ λ log λ) needs only d×d work.
    """
    if n <= 0:
        raise ValueError(f"Vendi score needs at least one item; got n={n}")
    gram = np.asarray(gram, dtype=np.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square (dim, dim) matrix; got shape {gram.shape}")
    return _entropy_exp(np.linalg.eigvalsh(gram / n))


def vendi_score(embeddings: np.ndarray) -> float:
    """Vendi score v = exp(−Σ λ log λ), λ the eigenvalues of K/n with K the cosine similarities of the rows.

    Ranges from 1 (all items alike) to n (all mutually orthogonal). Uses the d×d dual form when n > d
    and the n×n kernel otherwise.
    """
    matrix = _as_matrix(embeddings)
    n, dim = matrix.shape
    if n == 0:
        raise ValueError("Vendi score needs at least one item; got an empty embedding matrix")
    if n > dim:
        return vendi_from_gram(normalized_gram(matrix), n)
    rows = _normalized(matrix.astype(np.float64))
    return _entropy_exp(np.linalg.eigvalsh(rows @ rows.T / n))


class RunningGram:
    """Σ xxᵀ over the normalized embeddings of D_self-gen, so Vendi of D ∪ y never revisits D's rows.

    Scoring a candidate's responses y costs O(|y|·d² + d³) however large D grows.
    """

    def __init__(self, dim: int):
        if dim <= 0:
            raise ValueError(f"RunningGram dim must be positive; got {dim}")
        self.dim = int(dim)
        self.gram = np.zeros((self.dim, self.dim), dtype=np.float64)
        self.count = 0

    def _checked(self, embeddings: np.ndarray) -> np.ndarray:
        matrix = _as_matrix(embeddings)
        if matrix.shape[1] != self.dim:
            raise ValueError(f"embeddings have dim {matrix.shape[1]} but this RunningGram holds dim {self.dim}; "
                             "use the same embedder for D_self-gen and for scoring")
        return matrix

    def add(self, embeddings: np.ndarray) -> None:
        """Fold new members of D_self-gen into the running sum."""
        matrix = self._checked(embeddings)
        self.gram += normalized_gram(matrix)
        self.count += matrix.shape[0]

    def vendi(self) -> float:
        """Vendi score of D_self-gen itself."""
        return vendi_from_gram(self.gram, self.count)

    def vendi_with(self, new_embeddings: np.ndarray) -> float:
        """Vendi score of D_self-gen ∪ new, leaving the running sum untouched."""
        matrix = self._checked(new_embeddings)
        return vendi_from_gram(self.gram + normalized_gram(matrix), self.count + matrix.shape[0])

    def normalized_diversity_with(self, new_embeddings: np.ndarray) -> float:
        """Vendi(D ∪ new) / |D ∪ new|, in (0, 1]: the diversity term v of the Reveal score."""
        n_new = _as_matrix(new_embeddings).shape[0]
        return self.vendi_with(new_embeddings) / (self.count + n_new)

    def state_dict(self) -> dict:
        return {"dim": self.dim, "count": self.count, "gram": self.gram.copy()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "RunningGram":
        gram = np.asarray(state["gram"], dtype=np.float64)
        running = cls(int(state["dim"]))
        if gram.shape != (running.dim, running.dim):
            raise ValueError(f"checkpointed gram has shape {gram.shape}, expected ({running.dim}, {running.dim}); "
                             "the checkpoint is from a different embedder — delete it to recompute")
        running.gram = gram.copy()
        running.count = int(state["count"])
        return running
