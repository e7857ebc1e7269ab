"""NeuralUCB over a fixed pool of arms (INSTINCT's bandit): which soft prompts Reveal scores next.

Symbols of the paper → names here: λ → reg_lambda, ν → nu, U (the diagonal of the design matrix
λI + Σ g gᵀ) → design_diagonal, g(arm) → the gradient of the network's output wrt its parameters.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Collection, Hashable, Sequence

import numpy as np
import torch

_STATE_VERSION = 1


@contextmanager
def _single_torch_thread():
    """Run the fit on one torch thread, then give the caller's setting back.

    The fit is hundreds of tiny ops: on a busy machine a multi-threaded pool spends its time
    synchronizing (measured on 2 shared cores: up to 2.4 s per fit on 2 threads, 0.04–0.13 s on 1), and one
    thread also makes the result independent of the machine's core count. torch's thread count is
    process-wide, so torch work in other Python threads runs single-threaded while a fit is in flight.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class NeuralUCB:
    """An MLP features → hidden → 1 (ReLU) refit on the observed (arm, score) pairs, plus a diagonal
    exploration bonus σ(arm) = sqrt(Σ λ·ν·g(arm)² / U); the arm with the highest f(arm) + σ(arm) is
    picked and U += g(arm)² for it.

    The fit is deterministic given the observations: every refit starts from the same seeded init and
    runs full-batch Adam for `train_steps` steps on one torch thread (so one torch build gives the same
    fit whatever the core count). U only changes in `select_batch`, so `state_dict()` taken after a
    selection resumes exactly; one taken before it reproduces that selection.

    reg_lambda = nu = 0.1 are INSTINCT's defaults. With 1.0/1.0 the bonus swamps scores in [0, 1]:
    on a synthetic pool of 1,000 arms with 64-dim features it needed more pulls than random choice
    to reach a top-1% arm (171 vs 91 expected), against 33 with 0.1/0.1.
    """

    def __init__(self, features: np.ndarray, hidden: int = 100, reg_lambda: float = 0.1, nu: float = 0.1,
                 lr: float = 1e-3, train_steps: int = 200, seed: int = 0):
        raw = np.asarray(features, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[0] == 0 or raw.shape[1] == 0:
            raise ValueError(f"features must be a non-empty (n_arms, feature_dim) array; got shape {raw.shape}")
        if not np.all(np.isfinite(raw)):
            raise ValueError("features contain NaN or inf; recompute the arm pool's hidden states")
        if hidden < 1 or train_steps < 0:
            raise ValueError(f"hidden must be ≥ 1 and train_steps ≥ 0; got hidden={hidden}, train_steps={train_steps}")
        if reg_lambda <= 0 or nu < 0 or lr <= 0:
            raise ValueError(f"reg_lambda and lr must be > 0 and nu ≥ 0; got reg_lambda={reg_lambda}, nu={nu}, lr={lr}")

        std = raw.std(axis=0)
        std[std == 0] = 1.0  # a constant feature carries no information; leave it at 0 after centring
        self.features = (raw - raw.mean(axis=0)) / std
        self._features_squared = self.features ** 2
        self._features_tensor = torch.from_numpy(self.features.astype(np.float32))
        self.n_arms, self.feature_dim = self.features.shape
        self.hidden = int(hidden)
        self.reg_lambda = float(reg_lambda)
        self.nu = float(nu)
        self.lr = float(lr)
        self.train_steps = int(train_steps)
        self.seed = int(seed)

        self.observations: list[tuple[int, float]] = []
        self.warm_observations: list[tuple[int, float]] = []
        self.design_diagonal = np.full(self.n_parameters, self.reg_lambda, dtype=np.float64)
        self._params: dict[str, np.ndarray] | None = None
        self._fitted_on: tuple[int, int] | None = None

    # --- parameters, in torch order: hidden weight (h×f), hidden bias (h), output weight (h), output bias (1)

    @property
    def n_parameters(self) -> int:
        return self.hidden * self.feature_dim + 2 * self.hidden + 1

    def _design_parts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        h, f = self.hidden, self.feature_dim
        u = self.design_diagonal
        return (u[:h * f].reshape(h, f), u[h * f:h * f + h], u[h * f + h:h * f + 2 * h], u[h * f + 2 * h:])

    def _initial_parameters(self) -> list[torch.Tensor]:
        # nn.Linear's default init, drawn from a local generator so the global torch RNG is left alone.
        generator = torch.Generator().manual_seed(self.seed)

        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)
            return ((torch.rand(shape, generator=generator) * 2 - 1) * bound).requires_grad_(True)

        f, h = self.feature_dim, self.hidden
        return [uniform((h, f), f), uniform((h,), f), uniform((h,), h), uniform((1,), h)]

    @staticmethod
    def _forward(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        hidden_weight, hidden_bias, output_weight, output_bias = params
        return torch.relu(x @ hidden_weight.T + hidden_bias) @ output_weight + output_bias

    # --- data

    def _check_arm(self, arm_index: int) -> int:
        arm = int(arm_index)
        if not 0 <= arm < self.n_arms:
            raise ValueError(f"arm index {arm_index} is outside the pool of {self.n_arms} arms")
        return arm

    @staticmethod
    def _check_score(score: float) -> float:
        value = float(score)
        if not math.isfinite(value):
            raise ValueError(f"score must be finite; got {score}")
        return value

    def observe(self, arm_index: int, score: float) -> None:
        """Record a scored arm; it (and every arm sharing its distinct key) is not proposed again."""
        self.observations.append((self._check_arm(arm_index), self._check_score(score)))

    def warm_start(self, arm_indices: Sequence[int], scores: Sequence[float]) -> None:
        """Seed the fit with earlier outer loops' top arms.

        Warm observations train the network but are not marked as scored and leave U alone: their
        scores were measured against an older D_self-gen, so the bandit may pick them again to rescore.
        """
        if len(arm_indices) != len(scores):
            raise ValueError(f"warm_start got {len(arm_indices)} arms but {len(scores)} scores")
        self.warm_observations.extend((self._check_arm(a), self._check_score(s)) for a, s in zip(arm_indices, scores))

    # --- fit and estimates

    def fit(self) -> None:
        """Refit the network from its seeded init on all observations (warm ones included)."""
        params = self._initial_parameters()
        data = self.warm_observations + self.observations
        if data and self.train_steps > 0:
            with _single_torch_thread():
                self._train(params, data)
        names = ("hidden_weight", "hidden_bias", "output_weight", "output_bias")
        self._params = {name: p.detach().numpy().astype(np.float64) for name, p in zip(names, params)}
        self._fitted_on = (len(self.warm_observations), len(self.observations))

    def _train(self, params: list[torch.Tensor], data: list[tuple[int, float]]) -> None:
        """Full-batch Adam on the mean squared error, in place on params."""
        arms = torch.tensor([a for a, _ in data], dtype=torch.long)
        targets = torch.tensor([s for _, s in data], dtype=torch.float32)
        inputs = self._features_tensor[arms]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        for _ in range(self.train_steps):
            optimizer.zero_grad()
            loss = torch.mean((self._forward(params, inputs) - targets) ** 2)
            loss.backward()
            optimizer.step()

    def _ensure_fitted(self) -> dict[str, np.ndarray]:
        if self._params is None or self._fitted_on != (len(self.warm_observations), len(self.observations)):
            self.fit()
        return self._params

    def _activations(self, arm_indices=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per arm: the predicted score, the hidden activations, and ∂output/∂pre-activation."""
        p = self._ensure_fitted()
        x = self.features if arm_indices is None else self.features[np.asarray(arm_indices, dtype=np.int64)]
        pre = x @ p["hidden_weight"].T + p["hidden_bias"]
        active = pre > 0
        activation = np.where(active, pre, 0.0)
        mean = activation @ p["output_weight"] + p["output_bias"][0]
        return mean, activation, np.where(active, p["output_weight"], 0.0)

    def gradient_features(self, arm_indices: Sequence[int]) -> np.ndarray:
        """g(arm) for the given arms, flattened in torch parameter order: (len(arm_indices), n_parameters).

        Analytic for the 2-layer MLP: ∂/∂W1 = (w2 ⊙ 1[pre>0]) xᵀ, ∂/∂b1 = w2 ⊙ 1[pre>0], ∂/∂w2 = relu(pre),
        ∂/∂b2 = 1. Materializes h·f values per arm, so select_batch never calls it for the whole pool.
        """
        arms = np.asarray(arm_indices, dtype=np.int64)
        _, activation, pre_grad = self._activations(arms)
        x = self.features[arms]
        hidden_weight_grad = (pre_grad[:, :, None] * x[:, None, :]).reshape(len(arms), -1)
        return np.concatenate([hidden_weight_grad, pre_grad, activation, np.ones((len(arms), 1))], axis=1)

    def _bonus_squared(self, activation: np.ndarray, pre_grad: np.ndarray) -> np.ndarray:
        # Σ_p g_p²/U_p without materializing g: the hidden-weight block factorizes as
        # Σ_jk c_j² x_k² / U_jk = Σ_j c_j² · (x² · (1/U)ᵀ)_j, which is O(arms·f·h) and no h·f per arm.
        u_hw, u_hb, u_ow, u_ob = self._design_parts()
        pre_grad_sq = pre_grad ** 2
        total = np.einsum("ij,ij->i", pre_grad_sq, self._features_squared @ (1.0 / u_hw).T)
        total += pre_grad_sq @ (1.0 / u_hb) + activation ** 2 @ (1.0 / u_ow) + 1.0 / u_ob[0]
        return self.reg_lambda * self.nu * total

    def estimates(self) -> tuple[np.ndarray, np.ndarray]:
        """(predicted score, exploration bonus σ) for every arm under the current fit and U."""
        mean, activation, pre_grad = self._activations()
        return mean, np.sqrt(self._bonus_squared(activation, pre_grad))

    def _add_to_design(self, arm: int, activation: np.ndarray, pre_grad: np.ndarray) -> None:
        u_hw, u_hb, u_ow, u_ob = self._design_parts()  # views into design_diagonal
        u_hw += np.outer(pre_grad[arm] ** 2, self._features_squared[arm])
        u_hb += pre_grad[arm] ** 2
        u_ow += activation[arm] ** 2
        u_ob += 1.0

    # --- selection

    def select_batch(self, batch_size: int, exclude: Collection[int] = frozenset(),
                     distinct_key: Sequence[Hashable] | None = None) -> list[int]:
        """Pick up to batch_size arms by UCB, one at a time, adding each pick's g² to U before the next
        (a fantasized update, so the batch spreads out). U keeps these updates.

        Skipped: arms in `exclude`, and arms whose key (distinct_key[arm], e.g. the decoded instruction
        text; the arm index itself when None) is already in the batch or belongs to an observed arm.
        Returns fewer arms when the pool runs out; ties go to the lowest index.
        """
        if batch_size < 0:
            raise ValueError(f"batch_size must be ≥ 0; got {batch_size}")
        if distinct_key is not None and len(distinct_key) != self.n_arms:
            raise ValueError(f"distinct_key has {len(distinct_key)} entries but the pool has {self.n_arms} arms")
        key_of = (lambda arm: distinct_key[arm]) if distinct_key is not None else (lambda arm: arm)
        arms_by_key: dict[Hashable, list[int]] = defaultdict(list)
        for arm in range(self.n_arms):
            arms_by_key[key_of(arm)].append(arm)

        eligible = np.ones(self.n_arms, dtype=bool)
        for arm in exclude:
            eligible[self._check_arm(arm)] = False
        for arm, _ in self.observations:
            eligible[arms_by_key[key_of(arm)]] = False

        mean, activation, pre_grad = self._activations()
        picks: list[int] = []
        while len(picks) < batch_size and eligible.any():
            ucb = mean + np.sqrt(self._bonus_squared(activation, pre_grad))
            arm = int(np.argmax(np.where(eligible, ucb, -np.inf)))
            picks.append(arm)
            eligible[arms_by_key[key_of(arm)]] = False
            self._add_to_design(arm, activation, pre_grad)
        return picks

    # --- checkpoints

    def state_dict(self) -> dict:
        """Everything a resumed run needs: observations and U (the network is refit from them)."""
        return {
            "version": _STATE_VERSION,
            "n_arms": self.n_arms, "feature_dim": self.feature_dim, "hidden": self.hidden, "seed": self.seed,
            "observations": [[a, s] for a, s in self.observations],
            "warm_observations": [[a, s] for a, s in self.warm_observations],
            "design_diagonal": self.design_diagonal.copy(),
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("n_arms", "feature_dim", "hidden", "seed"):
            if int(state[name]) != getattr(self, name):
                raise ValueError(f"bandit checkpoint has {name}={state[name]} but this bandit has "
                                 f"{getattr(self, name)}; the arm pool or config changed — delete the checkpoint "
                                 "to restart the search")
        design = np.asarray(state["design_diagonal"], dtype=np.float64)
        if design.shape != (self.n_parameters,):
            raise ValueError(f"bandit checkpoint's design_diagonal has shape {design.shape}, "
                             f"expected ({self.n_parameters},)")
        self.observations = [(self._check_arm(a), self._check_score(s)) for a, s in state["observations"]]
        self.warm_observations = [(self._check_arm(a), self._check_score(s)) for a, s in state["warm_observations"]]
        self.design_diagonal = design.copy()
        self._params = None
        self._fitted_on = None
