"""C3PO's test-time re-mixing of routing (arXiv 2504.07964, its neighbourhood kernel-regression
variant), the training-free baseline RoMA is compared with (docs/methods.md).

For a test sample i with task embedding e_i: its k nearest *successful* reference samples j in the
routing bank (the samples the base model answers, as RoMA's neighbours, by the same search), Gaussian
weights ``W_ij = softmax_j(-||e_i - e_j||² / 2σ²)``, and the kernel regression of their routing

    r̂_i = Σ_j W_ij r_j                         (the bank's routing distributions, tuned layers)
    r'_i = (1 - α) r_i + α r̂_i                 (α = 1: the regression itself, the released default)

imposed on the tuned layers at the sample's last prompt token, layer after layer in one pass (r_i is
what the router computes there, its input already shaped by the re-mix below it): the router routes as
if its distribution over experts were r' — top-k and weights follow the model's own rule from it, by
setting its logits to ``log r'`` (``suffix_scores(..., remix=(r̂, α))``). Only a softmax router's
distribution can be imposed that way; sigmoid-scored routers (DeepSeek-V3, GLM-4.5) are refused.
Nothing is trained; the cost is one extra pass over the tuned suffix per sample, measured and reported.

Unlike the paper, all experts are re-mixed (not only the 20 "core" experts of each layer): with the
tiny models' 8 to 64 experts the restriction would change little, and it is one more setting to tune.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from . import roma
from .bank import Bank


@dataclass(frozen=True)
class C3PO:
    """C3PO's settings and what it re-mixes toward: the bank and the evaluated records' embeddings."""

    bank: Bank
    embeddings: np.ndarray  # [records, D], unit rows, row i for record i
    k: int = 3
    sigma: float = 0.4
    alpha: float = 1.0

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise UserError(f"--c3po-alpha must be in (0, 1], got {self.alpha}")
        if not np.asarray(self.bank.correct).any():
            raise UserError(
                "the routing bank has no sample the base model answers correctly: C3PO has no neighbour to "
                "re-mix toward (use more or easier reference data)"
            )
        if self.embeddings.shape[1] != self.bank.embeddings.shape[1]:
            raise UserError(
                f"the evaluation embeddings have {self.embeddings.shape[1]} dimensions, the routing bank's "
                f"{self.bank.embeddings.shape[1]}: embed both with the same model"
            )

    def targets(self, rows: np.ndarray) -> np.ndarray:
        """r̂ [len(rows), layers, E]: the kernel regression of the successful neighbours' routing."""
        nb = roma.neighbours(self.bank.embeddings, self.bank.correct, self.k, self.sigma, queries=self.embeddings[rows])
        targets, weights = roma.neighbour_targets(self.bank.routing, nb, np.arange(len(rows)))  # RoMA's, [B, k, L·E]
        mixed = (weights.astype(np.float64)[:, :, None] * targets.astype(np.float64)).sum(1)
        return mixed.reshape(len(rows), *self.bank.routing.shape[1:]).astype(np.float32)


def check_routers(spec, layers) -> None:
    """C3PO imposes a distribution through the logits of a softmax router; refuse the others in one line."""
    sigmoid = [i for i in layers if spec.moe_at(i).router.scoring != "softmax"]
    if sigmoid:
        raise UserError(
            f"--c3po needs softmax routers; layers {sigmoid} of this model score experts with a sigmoid "
            "(DeepSeek-V3 / GLM-4.5 style), whose routing C3PO cannot impose"
        )
