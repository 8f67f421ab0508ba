"""The latent as named codes: each code has a prior, and the model gives it a discriminator."""

from aae_lightning.priors import Prior


class LatentCode:
    """One named part of the latent space.

    Args:
        name: key of the code in ``model.encode(x)`` and in logged metrics (``y``, ``z``, ...).
        prior: the distribution the aggregated posterior of this code is matched to.
        weight: scale of this code's adversarial loss in the generator phase.
        balance_weight: opt-in, beyond the paper, categorical codes only: in the generator phase,
            also minimise KL(batch mean of q(y|x) || uniform). It counters the early collapse onto
            a few categories that the adversarial loss alone escapes only slowly.
    """

    def __init__(self, name: str, prior: Prior, weight: float = 1.0, balance_weight: float = 0.0):
        if not name.isidentifier():
            raise ValueError(f"LatentCode: name must be an identifier such as 'y' or 'z', got {name!r}")
        if weight < 0:
            raise ValueError(f"LatentCode {name!r}: weight must be >= 0, got {weight}")
        if balance_weight < 0 or (balance_weight > 0 and not prior.num_classes):
            raise ValueError(f"LatentCode {name!r}: balance_weight must be >= 0 and needs a categorical prior, got {balance_weight} with {prior!r}")
        self.name = name
        self.prior = prior
        self.weight = weight
        self.balance_weight = balance_weight

    @property
    def dim(self) -> int:
        return self.prior.dim

    def __repr__(self) -> str:
        return f"LatentCode(name={self.name!r}, prior={self.prior!r}, weight={self.weight}, balance_weight={self.balance_weight})"
