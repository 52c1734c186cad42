"""The one optimiser of the package: torch.optim.AdamW's update in float32 numpy.

Adam is AdamW with ``weight_decay=0`` (the decoupled decay is the only difference), so the tune loop
(AdamW on the routers) and the oracle (Adam on per-sample router-logit offsets) share this class.
Keeping the state in numpy makes steps identical on every backend and checkpoints backend-neutral.
"""

from __future__ import annotations

import math

import numpy as np


class AdamW:
    """Decoupled weight decay, bias-corrected moments: the update torch.optim.AdamW makes.

    ``params``: name -> array, copied to float32 and updated in place by :meth:`step`.
    """

    def __init__(self, params: dict, lr: float, weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = {k: np.array(v, dtype=np.float32) for k, v in params.items()}
        self.exp_avg = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.step_count = 0

    def step(self, grads: dict) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        bc1 = 1.0 - b1**self.step_count
        bc2_sqrt = math.sqrt(1.0 - b2**self.step_count)
        # An overflow leaves inf or NaN in the parameters, which the tune loop refuses in one line
        # (tune.check_routers); numpy's own warning would only add lines to that.
        with np.errstate(over="ignore", invalid="ignore"):
            self._update(grads, bc1, bc2_sqrt)

    def _update(self, grads: dict, bc1: float, bc2_sqrt: float) -> None:
        b1, b2 = self.betas
        for k, p in self.params.items():
            g = np.asarray(grads[k], dtype=np.float32)
            if self.weight_decay:
                p *= np.float32(1.0 - self.lr * self.weight_decay)
            m, v = self.exp_avg[k], self.exp_avg_sq[k]
            m += (g - m) * np.float32(1.0 - b1)
            v *= np.float32(b2)
            v += np.float32(1.0 - b2) * g * g
            denom = np.sqrt(v) / np.float32(bc2_sqrt) + np.float32(self.eps)
            p -= np.float32(self.lr / bc1) * (m / denom)

    def state(self) -> tuple[dict, dict]:
        """(tensors: parameters and moments by name, info: the step count) for a checkpoint."""
        tensors = {}
        for k in self.params:
            tensors[k] = self.params[k]
            tensors[f"{k}.exp_avg"] = self.exp_avg[k]
            tensors[f"{k}.exp_avg_sq"] = self.exp_avg_sq[k]
        return tensors, {"step": self.step_count}

    def load(self, tensors: dict, info: dict) -> None:
        for k in self.params:
            self.params[k] = np.array(tensors[k], dtype=np.float32)
            self.exp_avg[k] = np.array(tensors[f"{k}.exp_avg"], dtype=np.float32)
            self.exp_avg_sq[k] = np.array(tensors[f"{k}.exp_avg_sq"], dtype=np.float32)
        self.step_count = int(info["step"])


def adam(params: dict, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> AdamW:
    """torch.optim.Adam's update (no weight decay)."""
    return AdamW(params, lr, weight_decay=0.0, betas=betas, eps=eps)
