"""The latent as named codes: each code has a prior, and the model gives it a discriminator."""

from typing import Literal

from aae_lightning.priors import Prior


class LatentCode:
    """One named part of the latent space.

    Args:
        name: key of the code in ``model.encode(x)`` and in logged metrics (``y``, ``z``, ...).
        prior: the distribution the aggregated posterior of this code is matched to.
        weight: scale of this code's adversarial loss in the generator phase.
        source: ``encoder`` (the encoder infers the code, a discriminator regularizes it) or
            ``label``: the one-hot label itself goes to the decoder, nothing is inferred or
            regularized (the supervised AAE of paper sec. 4, where the encoder learns only style).
        conditioned: the discriminator also sees the label, one-hot with one extra "unlabelled"
            slot, and real samples come from the label's part of the prior (paper sec. 2.3, Fig. 4).
    """

    def __init__(self, name: str, prior: Prior, weight: float = 1.0, source: Literal["encoder", "label"] = "encoder", conditioned: bool = False):
        if not name.isidentifier():
            raise ValueError(f"LatentCode: name must be an identifier such as 'y' or 'z', got {name!r}")
        if weight < 0:
            raise ValueError(f"LatentCode {name!r}: weight must be >= 0, got {weight}")
        if source not in ("encoder", "label"):
            raise ValueError(f"LatentCode {name!r}: source must be 'encoder' or 'label', got {source!r}")
        if source == "label" and (not prior.num_classes or conditioned):
            raise ValueError(f"LatentCode {name!r}: a code taken from the label needs a categorical prior and no conditioning")
        if conditioned and prior.num_parts is None:
            raise ValueError(f"LatentCode {name!r}: conditioned=True needs a prior whose parts labels can pick "
                             f"(mixture, swiss roll, categorical), got {prior!r}")
        self.name = name
        self.prior = prior
        self.weight = weight
        self.source = source
        self.conditioned = conditioned

    @property
    def dim(self) -> int:
        return self.prior.dim

    @property
    def inferred(self) -> bool:
        """Whether the encoder produces this code (and a discriminator regularizes it)."""
        return self.source == "encoder"

    def __repr__(self) -> str:
        return (f"LatentCode(name={self.name!r}, prior={self.prior!r}, weight={self.weight}, "
                f"source={self.source!r}, conditioned={self.conditioned})")
