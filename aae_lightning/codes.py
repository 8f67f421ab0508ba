"""The latent as named codes: each code has a prior, and the model gives it a discriminator."""

from typing import Literal

from aae_lightning.priors import Prior


class LatentCode:
    """One part of the latent space. Its name (``y``, ``z``, ...) is its key in the model's
    ``codes``: the key of the code in ``model.encode(x)``, in logged metrics and on the command
    line (``--model.codes.y.prior.num_classes=30``).

    Args:
        prior: the distribution the aggregated posterior of this code is matched to.
        weight: scale of this code's adversarial loss in the generator phase.
        source: ``encoder`` (the encoder infers the code, a discriminator regularizes it) or
            ``label``: the one-hot label itself goes to the decoder, nothing is inferred or
            regularized (the supervised AAE of paper sec. 4, where the encoder learns only style).
        conditioned: the discriminator also sees the label, one-hot with one extra "unlabelled"
            slot, and real samples come from the label's part of the prior (paper sec. 2.3, Fig. 4).
        added_to: the decoder sees this code multiplied by a matrix W and added to the code of
            that name instead of beside it: for a categorical y, W's rows are cluster heads and
            the decoder input W y + z is an n-D map of the data (paper sec. 7).
        head_scale: the heads' scale: learned heads start from N(0, head_scale^2) (Adam moves
            them by about the learning rate per step, so they must start apart); fixed ones are
            ``head_scale`` x I.
        learned_heads: W learned with the autoencoder; false: fixed to ``head_scale`` x I (the
            two codes of equal size: the paper's 10-D semi-supervised map).
    """

    # set by the model from the code's key
    name: str = ""

    def __init__(self, prior: Prior, weight: float = 1.0, source: Literal["encoder", "label"] = "encoder", conditioned: bool = False,
                 added_to: str | None = None, head_scale: float = 1.0, learned_heads: bool = True):
        if weight < 0:
            raise ValueError(f"LatentCode: weight must be >= 0, got {weight}")
        if source not in ("encoder", "label"):
            raise ValueError(f"LatentCode: source must be 'encoder' or 'label', got {source!r}")
        if source == "label" and (not prior.num_classes or conditioned):
            raise ValueError("LatentCode: a code taken from the label needs a categorical prior and no conditioning")
        if conditioned and prior.num_parts is None:
            raise ValueError("LatentCode: conditioned=True needs a prior whose parts labels can pick "
                             f"(mixture, swiss roll, categorical), got {prior!r}")
        if head_scale <= 0:
            raise ValueError(f"LatentCode: head_scale must be > 0, got {head_scale}")
        self.prior = prior
        self.weight = weight
        self.source = source
        self.conditioned = conditioned
        self.added_to = added_to
        self.head_scale = head_scale
        self.learned_heads = learned_heads

    @property
    def dim(self) -> int:
        return self.prior.dim

    @property
    def inferred(self) -> bool:
        """Whether the encoder produces this code (and a discriminator regularizes it)."""
        return self.source == "encoder"

    def __repr__(self) -> str:
        return (f"LatentCode(prior={self.prior!r}, weight={self.weight}, "
                f"source={self.source!r}, conditioned={self.conditioned}"
                + (f", added_to={self.added_to!r}, head_scale={self.head_scale}, learned_heads={self.learned_heads}" if self.added_to else "")
                + ")")
