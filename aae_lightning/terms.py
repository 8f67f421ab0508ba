"""Training terms beyond the paper: extra losses on a categorical code, added to the generator
phase (the encoder's adversarial step), each with its own weight. The module with no terms is the
paper's method; a config turns one on with one list entry, and ``--print_config`` lists them."""

import math

import torch
import torch.nn.functional as F

from aae_lightning.perturbations import Perturbation


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of probabilities."""
    return -(p * torch.log(p + 1e-8)).sum(-1)


class TrainingTerm:
    """One extra loss. ``code``: the categorical code it acts on; default the model's cluster code.

    ``loss(model, x, codes)`` gets the clean image batch and the codes the generator phase
    encoded, and returns the unweighted loss; the model multiplies by ``weight``.
    """

    def __init__(self, weight: float = 1.0, code: str | None = None):
        if weight < 0:
            raise ValueError(f"{type(self).__name__}: weight must be >= 0, got {weight}")
        self.weight = weight
        self.code = code

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def loss(self, model, x: torch.Tensor, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class MutualInformation(TrainingTerm):
    """log K - [H(E_x q(y|x)) - conditional_weight * E_x H(q(y|x))] over the batch: with
    ``conditional_weight`` 1 it is log K minus the mutual information between image and code,
    zero exactly for confident assignments spread evenly over the K categories (IMSAT's term)."""

    def __init__(self, weight: float = 1.0, code: str | None = None, conditional_weight: float = 1.0):
        super().__init__(weight, code)
        if conditional_weight < 0:
            raise ValueError(f"{type(self).__name__}: conditional_weight must be >= 0, got {conditional_weight}")
        self.conditional_weight = conditional_weight

    def loss(self, model, x, codes):
        q = codes[self.code]
        marginal_gap = math.log(q.shape[1]) - entropy(q.mean(0))
        return marginal_gap + self.conditional_weight * entropy(q).mean()


class Balance(MutualInformation):
    """KL(batch mean of q(y|x) || uniform): the marginal half of the mutual information alone. It
    counters the early collapse onto a few categories that the adversarial loss escapes slowly."""

    def __init__(self, weight: float = 1.0, code: str | None = None):
        super().__init__(weight, code, conditional_weight=0.0)


class Consistency(TrainingTerm):
    """KL(q(y|x) || q(y|perturbation(x))), the first held fixed: a perturbed image must land in
    the same category. The perturbation says what the categories should not depend on (shifts,
    affine maps, virtual adversarial directions)."""

    def __init__(self, perturbation: Perturbation, weight: float = 1.0, code: str | None = None):
        super().__init__(weight, code)
        self.perturbation = perturbation

    def loss(self, model, x, codes):
        def predict(images):
            return model.encode(images)[self.code]

        target = codes[self.code].detach()
        return F.kl_div(torch.log(predict(self.perturbation(x, predict)) + 1e-8), target, reduction="batchmean")
