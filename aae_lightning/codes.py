"""The latent as named codes: each code has a prior, and the model gives it a discriminator."""

from aae_lightning.priors import Prior


class LatentCode:
    """One named part of the latent space.

    Args:
        name: key of the code in ``model.encode(x)`` and in logged metrics (``y``, ``z``, ...).
        prior: the distribution the aggregated posterior of this code is matched to.
        weight: scale of this code's adversarial loss in the generator phase.
    """

    def __init__(self, name: str, prior: Prior, weight: float = 1.0):
        if not name.isidentifier():
            raise ValueError(f"LatentCode: name must be an identifier such as 'y' or 'z', got {name!r}")
        if weight < 0:
            raise ValueError(f"LatentCode {name!r}: weight must be >= 0, got {weight}")
        self.name = name
        self.prior = prior
        self.weight = weight

    @property
    def dim(self) -> int:
        return self.prior.dim

    def __repr__(self) -> str:
        return f"LatentCode(name={self.name!r}, prior={self.prior!r}, weight={self.weight})"
