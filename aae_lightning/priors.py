"""Priors p(code) that the aggregated posterior q(code) is matched to.

A prior fixes a code's dimension, how to sample it, and how the encoder's raw output is mapped
into the code's space (``activate``): a softmax for the categorical prior, the identity otherwise.
"""

import math

import torch

from aae_lightning.settings import SettingsRepr


class Prior(SettingsRepr):
    """A distribution over one latent code."""

    dim: int

    def sample(self, n: int, device: torch.device | str = "cpu", labels: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    @property
    def num_classes(self) -> int | None:
        """Number of classes of a categorical code, ``None`` for continuous ones."""
        return None

    @property
    def num_parts(self) -> int | None:
        """How many parts ``sample(labels=...)`` can pick from (one per class for a
        label-conditioned code), ``None`` where labels cannot pick a part."""
        return None


class GaussianPrior(Prior):
    """Isotropic N(0, std^2 I) of any dimension (paper sec. 2, the style code of sec. 5-6)."""

    def __init__(self, dim: int = 8, std: float = 1.0):
        if dim < 1:
            raise ValueError(f"GaussianPrior: dim must be >= 1, got {dim}")
        if std <= 0:
            raise ValueError(f"GaussianPrior: std must be > 0, got {std}")
        self.dim = dim
        self.std = std

    def sample(self, n, device="cpu", labels=None):
        return torch.randn(n, self.dim, device=device) * self.std


class GaussianMixturePrior(Prior):
    """Mixture of ``num_components`` 2-D Gaussians with centres evenly spaced on a circle (Fig. 2, 4).

    Each component is elongated tangentially, as in the paper's figures. ``labels`` pick the
    component per sample (used by label-conditioned discriminators); otherwise it is uniform.
    """

    dim = 2

    def __init__(self, num_components: int = 10, radius: float = 4.0, radial_std: float = 0.5, tangential_std: float = 0.1):
        if num_components < 1:
            raise ValueError(f"GaussianMixturePrior: num_components must be >= 1, got {num_components}")
        self.num_components = num_components
        self.radius = radius
        self.radial_std = radial_std
        self.tangential_std = tangential_std

    @property
    def num_parts(self) -> int:
        return self.num_components

    def sample(self, n, device="cpu", labels=None):
        if labels is None:
            labels = torch.randint(self.num_components, (n,), device=device)
        angle = labels.to(device=device, dtype=torch.float32) * (2 * math.pi / self.num_components)
        radial = self.radius + torch.randn(n, device=device) * self.radial_std
        tangential = torch.randn(n, device=device) * self.tangential_std
        cos, sin = torch.cos(angle), torch.sin(angle)
        return torch.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], dim=1)


class SwissRollPrior(Prior):
    """2-D swiss roll; the roll is cut into ``num_sections`` equal arcs that ``labels`` can select (Fig. 4)."""

    dim = 2

    def __init__(self, num_sections: int = 10, turns: float = 1.5, scale: float = 1.0, noise: float = 0.05):
        if num_sections < 1:
            raise ValueError(f"SwissRollPrior: num_sections must be >= 1, got {num_sections}")
        self.num_sections = num_sections
        self.turns = turns
        self.scale = scale
        self.noise = noise

    @property
    def num_parts(self) -> int:
        return self.num_sections

    def sample(self, n, device="cpu", labels=None):
        u = torch.rand(n, device=device)
        if labels is not None:
            u = (labels.to(device=device, dtype=torch.float32) + u) / self.num_sections
        # sqrt keeps the density per unit of arc length roughly uniform along the spiral
        t = torch.sqrt(u) * self.turns * 2 * math.pi
        r = t / (self.turns * 2 * math.pi) * 4 * self.scale
        xy = torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1)
        return xy + torch.randn_like(xy) * self.noise


class CategoricalPrior(Prior):
    """One-hot samples of a uniform Cat(num_classes) (the cluster / class code of sec. 5-6)."""

    def __init__(self, num_classes: int = 10):
        if num_classes < 2:
            raise ValueError(f"CategoricalPrior: num_classes must be >= 2, got {num_classes}")
        self.dim = num_classes

    @property
    def num_classes(self) -> int:
        return self.dim

    @property
    def num_parts(self) -> int:
        return self.dim

    def sample(self, n, device="cpu", labels=None):
        if labels is None:
            labels = torch.randint(self.dim, (n,), device=device)
        return torch.nn.functional.one_hot(labels.to(device), self.dim).float()

    def activate(self, raw):
        return torch.softmax(raw, dim=1)
