"""Perturbations of an image batch that should not change its class: what a consistency term is
invariant to. Each is called as ``perturbation(x, predict)``, where ``predict`` maps images to
the code's class probabilities (only the virtual adversarial one uses it)."""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from aae_lightning.settings import SettingsRepr
from aae_lightning.transforms import pen_blend

Predict = Callable[[torch.Tensor], torch.Tensor]


class Perturbation(SettingsRepr):
    """A random (or adversarial) change of an image batch, drawn afresh at every call."""

    # whether the change depends on ``predict``: then a copy serves only the code it was drawn for
    uses_predict = False

    def __call__(self, x: torch.Tensor, predict: Predict) -> torch.Tensor:
        raise NotImplementedError


def _warp(x: torch.Tensor, theta: torch.Tensor, mode: str, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Resample ``x`` under per-image affine maps ``theta``, plus a per-pixel ``displacement`` of
    the sampling grid (N, H, W, 2) in its [-1, 1] coordinates where given."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if displacement is not None:
        grid = grid + displacement
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


class RandomShift(Perturbation):
    """Each image translated by its own whole-pixel offset of up to ``max_shift`` pixels."""

    def __init__(self, max_shift: int = 2):
        if max_shift < 1:
            raise ValueError(f"RandomShift: max_shift must be >= 1, got {max_shift}")
        self.max_shift = max_shift

    def __call__(self, x, predict=None):
        n, _, h, w = x.shape
        offsets = torch.randint(-self.max_shift, self.max_shift + 1, (n, 2), device=x.device).to(x.dtype)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, 0, 2], theta[:, 1, 2] = offsets[:, 0] * 2 / w, offsets[:, 1] * 2 / h
        return _warp(x, theta, "nearest")


class RandomAffine(Perturbation):
    """Each image rotated by up to ``degrees``, scaled by a factor in ``scale``, sheared by up to
    ``shear`` degrees and shifted by up to ``max_shift`` pixels, all drawn per image (bilinear).
    ``stroke`` > 0 also thickens or thins each image's strokes by a share drawn in [-stroke, stroke]
    of a 3x3 dilation or erosion: pen width, which no affine map of the whole digit changes.

    On the GPU or CPU in one batched ``grid_sample``: torchvision's ``RandomAffine`` draws one map
    per call, so per-image maps would cost a Python loop per batch.
    """

    # the class default serves maps pickled (in a checkpoint's hyperparameters) before the setting existed
    stroke = 0.0

    def __init__(self, degrees: float = 15.0, scale: tuple[float, float] = (0.9, 1.1), shear: float = 0.0, max_shift: float = 3.0,
                 stroke: float = 0.0):
        if degrees < 0 or shear < 0 or max_shift < 0 or not 0 < scale[0] <= scale[1] or not 0 <= stroke <= 1:
            raise ValueError(f"RandomAffine: degrees, shear and max_shift must be >= 0, 0 < scale[0] <= scale[1] and 0 <= stroke <= 1, "
                             f"got degrees={degrees}, shear={shear}, max_shift={max_shift}, scale={scale}, stroke={stroke}")
        self.degrees, self.scale, self.shear, self.max_shift, self.stroke = degrees, tuple(scale), shear, max_shift, stroke

    def __call__(self, x, predict=None):
        return self.restroke(_warp(x, self.theta(x), "bilinear"))

    def restroke(self, x: torch.Tensor) -> torch.Tensor:
        """Each image blended with its 3x3 grey-level dilation (thicker strokes) or erosion
        (thinner) by its own share drawn in [-stroke, stroke]."""
        if self.stroke == 0:
            return x
        return pen_blend(x, torch.empty(len(x), device=x.device, dtype=x.dtype).uniform_(-self.stroke, self.stroke))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """One affine map per image, as ``affine_grid``'s (N, 2, 3) matrices."""
        n, _, h, w = x.shape

        def uniform(low, high):
            return torch.empty(n, device=x.device, dtype=x.dtype).uniform_(low, high)

        angle = uniform(-self.degrees, self.degrees) * (math.pi / 180)
        shear = uniform(-self.shear, self.shear) * (math.pi / 180)
        # grid_sample maps output to input coordinates, so the inverse scale enlarges the digit
        inverse_scale = 1 / uniform(*self.scale)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 1] = cos * inverse_scale, (-sin + torch.tan(shear) * cos) * inverse_scale
        theta[:, 1, 0], theta[:, 1, 1] = sin * inverse_scale, cos * inverse_scale
        theta[:, 0, 2] = uniform(-self.max_shift, self.max_shift) * 2 / w
        theta[:, 1, 2] = uniform(-self.max_shift, self.max_shift) * 2 / h
        return theta


class RandomElastic(RandomAffine):
    """RandomAffine's map plus a smooth random displacement of every pixel, per image (Simard et
    al. 2003's elastic distortion: uniform noise in [-1, 1] per pixel and axis, blurred by a
    Gaussian of ``sigma`` pixels, times ``alpha`` pixels). An affine map moves a digit as a whole;
    the field bends its strokes as another writer's would. Both go into one ``grid_sample``, so the
    image is interpolated once."""

    def __init__(self, alpha: float = 34.0, sigma: float = 5.0, degrees: float = 15.0, scale: tuple[float, float] = (0.9, 1.1),
                 shear: float = 0.0, max_shift: float = 3.0, stroke: float = 0.0):
        super().__init__(degrees, scale, shear, max_shift, stroke)
        if alpha < 0 or sigma <= 0:
            raise ValueError(f"RandomElastic: alpha must be >= 0 and sigma > 0, got alpha={alpha}, sigma={sigma}")
        self.alpha, self.sigma = alpha, sigma

    def __call__(self, x, predict=None):
        n, _, h, w = x.shape
        theta = self.theta(x)
        kernel = 2 * math.ceil(2 * self.sigma) + 1
        noise = torch.empty(n, 2, h, w, device=x.device, dtype=x.dtype).uniform_(-1, 1)
        field = gaussian_blur(noise, [kernel, kernel], [self.sigma, self.sigma]) * self.alpha
        # pixels to affine_grid's [-1, 1] coordinates, (x, y) last as the grid has them
        pixel = torch.tensor([2 / w, 2 / h], device=x.device, dtype=x.dtype)
        return self.restroke(_warp(x, theta, "bilinear", field.permute(0, 2, 3, 1) * pixel))


class VirtualAdversarial(Perturbation):
    """The direction that changes ``predict`` most (Miyato et al.'s VAT, one power iteration),
    scaled to an L2 radius: ``radius`` itself, or with ``neighbour`` = k, ``radius`` times each
    image's distance to its k-th nearest neighbour in the batch (IMSAT's per-example radius).
    ``xi``: the length of the probe step; much smaller and float32 loses the curvature."""

    uses_predict = True

    def __init__(self, radius: float = 0.25, neighbour: int | None = 10, xi: float = 0.1):
        if radius <= 0 or xi <= 0 or (neighbour is not None and neighbour < 1):
            raise ValueError(f"VirtualAdversarial: radius and xi must be > 0 and neighbour >= 1 (or null), "
                             f"got radius={radius}, xi={xi}, neighbour={neighbour}")
        self.radius, self.neighbour, self.xi = radius, neighbour, xi

    def radii(self, x: torch.Tensor) -> torch.Tensor:
        if self.neighbour is None:
            return torch.full((len(x),), self.radius, device=x.device, dtype=x.dtype)
        if self.neighbour >= len(x):
            raise ValueError(f"VirtualAdversarial: neighbour={self.neighbour} needs batches of more than {self.neighbour} images, got {len(x)}")
        distances = torch.cdist(x.flatten(1), x.flatten(1))
        # column 0 of the sorted row is the image itself
        return self.radius * distances.sort(dim=1).values[:, self.neighbour]

    def __call__(self, x, predict):
        x = x.detach()
        with torch.no_grad():
            target = predict(x)
        d = _unit(torch.randn_like(x)) * self.xi
        d.requires_grad_(True)
        with torch.enable_grad():
            divergence = F.kl_div(torch.log(predict(x + d) + 1e-8), target, reduction="batchmean")
            (grad,) = torch.autograd.grad(divergence, d)
        shape = (-1,) + (1,) * (x.dim() - 1)
        return x + _unit(grad) * self.radii(x).view(shape)


def _unit(d: torch.Tensor) -> torch.Tensor:
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (d.dim() - 1)))
