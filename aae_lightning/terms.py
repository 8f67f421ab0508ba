"""Training terms: extra losses on a categorical code, each with its own weight, added to the
phase it names (the generator phase, the encoder's adversarial step, unless said otherwise). The
module with no terms is the paper's method (but for its sec. 7 head cost, which is one too); a
config turns one on with one named entry, and ``--print_config`` lists them."""

import math
from typing import Literal

import torch
import torch.nn.functional as F

from aae_lightning.perturbations import Perturbation
from aae_lightning.settings import SettingsRepr


def fp32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 under bf16 autocast too: the codes are fp32, and a product of them in bf16
    (8 bits of mantissa) would feed its rounding to the terms' logarithms and softmaxes."""
    with torch.autocast(a.device.type, enabled=False):
        return a @ b


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of probabilities."""
    return -(p * torch.log(p + 1e-8)).sum(-1)


class TrainingTerm(SettingsRepr):
    """One extra loss. ``code``: the categorical code it acts on; default the model's cluster code.
    ``start_step``: the trainer's global step from which it joins (each batch takes three
    optimizer steps, four with a supervised phase); steps rather than epochs, so it starts after
    the same wall time whatever the size of the training set.

    ``loss(model, x, codes)`` gets the clean image batch and the codes its phase encoded, and
    returns the unweighted loss; the model multiplies by ``weight``.
    """

    # the optimizer step it joins: "generator" (encoder) or "reconstruction" (encoder, decoder, heads)
    phase = "generator"
    needs_heads = False
    # whether it reads the EMAWeights callback's average; the model refuses to fit without one
    needs_weight_average = False

    def __init__(self, weight: float = 1.0, code: str | None = None, start_step: int = 0):
        if weight < 0:
            raise ValueError(f"{type(self).__name__}: weight must be >= 0, got {weight}")
        if start_step < 0:
            raise ValueError(f"{type(self).__name__}: start_step must be >= 0, got {start_step}")
        self.weight = weight
        self.code = code
        self.start_step = start_step

    @property
    def codes_read(self) -> list[str]:
        """Codes besides ``code`` that the loss reads; the model checks that it infers them."""
        return []

    def loss(self, model, x: torch.Tensor, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def forget(self) -> None:
        """Drop what the term keeps of earlier batches' codes: their categories no longer mean
        what they did (``ClusterSplit`` rewrote one)."""


class MutualInformation(TrainingTerm):
    """log K - [H(E_x q(y|x)) - conditional_weight * E_x H(q(y|x))] over the batch: with
    ``conditional_weight`` 1 it is log K minus the mutual information between image and code,
    zero exactly for confident assignments spread evenly over the K categories (IMSAT's term)."""

    def __init__(self, conditional_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
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

    def __init__(self, **kwargs):
        super().__init__(conditional_weight=0.0, **kwargs)


class PerturbedTerm(TrainingTerm):
    """A term that compares each image's code with its perturbed copy's. The perturbation says
    what the categories should not depend on (shifts, affine maps, virtual adversarial directions)."""

    def __init__(self, perturbation: Perturbation, **kwargs):
        super().__init__(**kwargs)
        self.perturbation = perturbation

    def perturbed_code(self, model, x: torch.Tensor, perturbation: Perturbation | None = None) -> torch.Tensor:
        """q(y | perturbation(x)), with gradients to the encoder (shared with the phase's other
        terms under an equal perturbation); the term's own perturbation unless another is given."""
        return model.perturbed_code(self.perturbation if perturbation is None else perturbation, x, self.code)

    def perturbed_log_code(self, model, x: torch.Tensor, perturbation: Perturbation | None = None) -> torch.Tensor:
        """log q(y | perturbation(x)), floored for categories the code gives no mass."""
        return torch.log(self.perturbed_code(model, x, perturbation) + 1e-8)


class Consistency(PerturbedTerm):
    """KL(q(y|x) || q(y|perturbation(x))), the first held fixed: a perturbed image must land in
    the same category."""

    def loss(self, model, x, codes):
        target = codes[self.code].detach()
        return F.kl_div(self.perturbed_log_code(model, x), target, reduction="batchmean")


class TargetsFrom:
    """Where a term's q(y|x) targets come from (``targets``). ``"codes"``: the phase's own codes
    (the current weights, on the phase's noisy input). ``"weight_average"``: the
    :class:`~aae_lightning.EMAWeights` callback's average of the weights on the clean image, batch
    norm from its running statistics (a mean teacher, Tarvainen & Valpola 2017), which swings less
    than the last step's weights."""

    def __init__(self, targets: Literal["codes", "weight_average"] = "codes", **kwargs):
        super().__init__(**kwargs)
        if targets not in ("codes", "weight_average"):
            raise ValueError(f"{type(self).__name__}: targets must be 'codes' or 'weight_average', got {targets!r}")
        self.targets = targets

    @property
    def needs_weight_average(self) -> bool:
        return self.targets == "weight_average"

    def target_code(self, model, x, codes) -> torch.Tensor:
        if self.targets == "codes":
            return codes[self.code].detach()
        return model.averaged_codes(x)[self.code]


class SelfLabelling(TargetsFrom, PerturbedTerm):
    """Cross-entropy of q(y|perturbation(x)) against the argmax of q(y|x), over the images whose
    q(y|x) is at least ``threshold`` confident (FixMatch's pseudo-labels; the others add zero).
    Where labels anchor the categories, the confident predictions are mostly right and the term
    spreads them to the unlabelled images.

    ``perturbation`` may be a list of maps: a copy of each image under each, their cross-entropies
    added up, one pseudo-label for all (augmentation multiplicity, Fort et al. 2021: more views of
    each image a step). The maps must differ, since equal maps share one copy a phase.

    ``targets`` (:class:`TargetsFrom`): the weight average's pseudo-labels raised K = 16 test
    purity over five seeds (0.946 against 0.941; the clustering configs use them), tied with 100
    labels and lowered K = 30 on two seeds (docs/experiments.md: "Pseudo-labels from the weight
    average", "The weight average's pseudo-labels in the clustering configs")."""

    def __init__(self, perturbation: Perturbation | list[Perturbation], threshold: float = 0.95, **kwargs):
        super().__init__(perturbation=perturbation, **kwargs)
        if not 0 < threshold < 1:
            raise ValueError(f"SelfLabelling: threshold must lie in (0, 1), got {threshold}")
        maps = self.maps
        if not maps or len({repr(m) for m in maps}) < len(maps):
            raise ValueError(f"SelfLabelling: the list of perturbations needs distinct maps (equal ones share one copy), got {perturbation!r}")
        self.threshold = threshold

    @property
    def maps(self) -> list[Perturbation]:
        return self.perturbation if isinstance(self.perturbation, list) else [self.perturbation]

    def loss(self, model, x, codes):
        confidence, target = self.target_code(model, x, codes).max(1)
        confident = (confidence >= self.threshold).to(confidence.dtype)

        def cross_entropy(perturbation):
            log_code = self.perturbed_log_code(model, x, perturbation)
            return -(log_code.gather(1, target[:, None]).squeeze(1) * confident).mean()

        return sum(cross_entropy(perturbation) for perturbation in self.maps)


class InterpolationConsistency(TargetsFrom, TrainingTerm):
    """Squared distance between q(y | lam x + (1 - lam) x') and lam q(y|x) + (1 - lam) q(y|x'), the
    targets held fixed, for each image x and another image x' of the batch, lam ~ Beta(alpha,
    alpha) per pair (ICT, Verma et al. 2019; MixUp's interpolation on unlabelled images): between
    two images the code moves in a straight line, so the boundaries between categories fall where
    no images lie. ``targets``: see :class:`TargetsFrom`. One encoder pass of the mixed images.
    With 100 labels it did not lower the error, and at ICT's weight 10 it raised it
    (docs/experiments.md: "interpolation consistency")."""

    def __init__(self, alpha: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if alpha <= 0:
            raise ValueError(f"InterpolationConsistency: alpha must be > 0, got {alpha}")
        self.alpha = alpha

    def loss(self, model, x, codes):
        target = self.target_code(model, x, codes)
        partner = torch.randperm(len(x), device=x.device)
        concentration = torch.tensor(float(self.alpha), device=x.device)
        lam = torch.distributions.Beta(concentration, concentration).sample((len(x),))
        mixed = torch.lerp(x[partner], x, lam.view(-1, *[1] * (x.dim() - 1)).to(x.dtype))
        mixed_target = torch.lerp(target[partner], target, lam[:, None].to(target.dtype))
        return (model.encode(mixed)[self.code] - mixed_target).pow(2).sum(1).mean()


class HeadSeparation(TrainingTerm):
    """The paper's cluster-head cost (sec. 7): sum over pairs of heads (rows of the code's W) of
    max(0, threshold - their Euclidean distance), so every two clusters land at least
    ``threshold`` apart in the map. It trains the heads, so it joins the reconstruction phase."""

    phase = "reconstruction"
    needs_heads = True

    def __init__(self, threshold: float, **kwargs):
        super().__init__(**kwargs)
        if threshold <= 0:
            raise ValueError(f"HeadSeparation: threshold must be > 0, got {threshold}")
        self.threshold = threshold

    def loss(self, model, x, codes):
        heads = model.head_matrix(self.code)
        i, j = torch.triu_indices(len(heads), len(heads), offset=1, device=heads.device)
        # + 1e-12: the gradient of a norm is undefined where two heads coincide
        distance = ((heads[i] - heads[j]).pow(2).sum(1) + 1e-12).sqrt()
        return F.relu(self.threshold - distance).sum()


class CategoryRecovery(TrainingTerm):
    """-log q(y = c | decode(c, z)) for draws c, z from the priors: the encoder must tell which
    category an image was decoded from. The decoder is a category-conditional generator, so each
    batch brings new images whose category is known (generative augmentation); with
    ``train_decoder`` the decoder learns too to make the category visible (InfoGAN's mutual
    information loss, Chen et al. 2016, with the AAE's decoder as the generator). It trains the
    decoder or reads it, so it joins the reconstruction phase. One decoder and one encoder pass.
    A ``perturbation`` maps the drawn images before the encoder reads them: the decoder draws
    typical images, the map adds the variety real ones have."""

    phase = "reconstruction"

    def __init__(self, train_decoder: bool = False, perturbation: Perturbation | None = None, **kwargs):
        super().__init__(**kwargs)
        self.train_decoder = train_decoder
        self.perturbation = perturbation

    def loss(self, model, x, codes):
        draws = model.sample_prior(len(x))
        with torch.set_grad_enabled(self.train_decoder and torch.is_grad_enabled()):
            images = model.decode(draws).to(x.dtype)
        if self.perturbation is not None:
            images = self.perturbation(images, lambda v: model.encode(v)[self.code])
        q = model.encode(images)[self.code]
        return F.nll_loss(torch.log(q + 1e-8), draws[self.code].argmax(1))


class InstanceContrast(PerturbedTerm):
    """NT-Xent (SimCLR, Chen et al. 2020): each image's ``features`` (the named inferred codes,
    joined; default all of them) must lie nearer in cosine to its own perturbed copy's than to any
    other image's or copy's in the batch, a 2N-way classification at ``temperature``. The cluster
    terms compare categories only; this one asks the encoder to tell the images themselves apart,
    what Contrastive Clustering (Li et al. 2021) adds to a cluster-level term. On the style code
    alone: with the categorical code among the features, images of one cluster are negatives that
    the term pushes apart, against the cluster terms (docs/experiments.md)."""

    def __init__(self, perturbation: Perturbation, temperature: float = 0.5, features: list[str] | None = None, **kwargs):
        super().__init__(perturbation, **kwargs)
        if temperature <= 0:
            raise ValueError(f"InstanceContrast: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.features = features

    @property
    def codes_read(self) -> list[str]:
        return list(self.features or [])

    def loss(self, model, x, codes):
        copies = model.perturbed_codes(self.perturbation, x, self.code)
        names = self.features or list(copies)
        images = torch.cat([codes[name] for name in names], 1)
        features = F.normalize(torch.cat([images, torch.cat([copies[name] for name in names], 1)]), dim=1)
        similarity = fp32_matmul(features, features.T) / self.temperature
        n = len(images)
        similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=x.device), float("-inf"))
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(x.device)
        return F.cross_entropy(similarity, partner)


class PairedMutualInformation(PerturbedTerm):
    """log K - I(y; y') between the code of an image and of its perturbed copy (IIC, Ji et al.
    2019): the joint of the pair over the batch, symmetrised, is pushed towards confident,
    balanced and agreeing assignments at once; gradients reach both sides of the pair.

    ``marginal_weight`` (lambda, in [0.5, 1]) scales the marginals' entropies: the loss is
    H(y, y') - lambda (H(y) + H(y')) + (2 lambda - 1) log K, zero at best. At 1 it is IIC's; at
    0.5 it asks confidence and agreement only, not equal-sized clusters. With more clusters than
    classes (K = 16 for 10 digits) equal sizes cannot all be pure: 16 clusters of 6.25% hold
    digits of about 10% each, which caps purity near 0.85."""

    def __init__(self, perturbation: Perturbation, marginal_weight: float = 1.0, **kwargs):
        super().__init__(perturbation, **kwargs)
        if not 0.5 <= marginal_weight <= 1:
            raise ValueError(f"PairedMutualInformation: marginal_weight must lie in [0.5, 1], got {marginal_weight}")
        self.marginal_weight = marginal_weight

    def loss(self, model, x, codes):
        q = codes[self.code]
        joint = fp32_matmul(q.T, self.perturbed_code(model, x)) / len(q)
        joint = ((joint + joint.T) / 2).clamp_min(1e-8)

        def plogp(p):
            return (p * p.log()).sum()

        marginals = -plogp(joint.sum(0)) - plogp(joint.sum(1))
        return -plogp(joint) - self.marginal_weight * marginals + (2 * self.marginal_weight - 1) * math.log(q.shape[1])


class NeighbourAgreement(TrainingTerm):
    """-log <q(y|x), mean of q(y|n) over x's ``neighbours`` nearest other images n> (SCAN, Van
    Gansbeke et al. 2020): images close in the encoder's last hidden layer should share a category.
    The neighbours come from a memory of the last ``memory_size`` training images' hidden layers
    (cosine similarity) and clean codes, held fixed; one encoder pass without gradients per batch
    fills it. An image's own earlier entry is left out: it would only pull the image towards its
    past category. Pixel-space neighbours share the writer's style as often as the digit; the
    hidden layer, shaped by the invariance terms, shares the digit (kNN agreement 0.92 where the
    clusters' purity is 0.81-0.88). The term adds zero until the memory is full. The memory is not
    checkpointed: a resumed run refills it in ``memory_size`` images."""

    def __init__(self, neighbours: int = 10, memory_size: int = 2000, **kwargs):
        super().__init__(**kwargs)
        if neighbours < 1 or memory_size <= neighbours:
            raise ValueError(f"NeighbourAgreement: need 1 <= neighbours < memory_size, got {neighbours} and {memory_size}")
        self.neighbours = neighbours
        self.memory_size = memory_size
        self._memory: tuple[torch.Tensor, ...] | None = None

    @staticmethod
    def fingerprint(x: torch.Tensor) -> torch.Tensor:
        """A number per image, equal for equal images: a weighted sum of its pixels in fp64."""
        pixels = x.flatten(1).double()
        return pixels @ torch.linspace(1, 2, pixels.shape[1], dtype=torch.float64, device=x.device)

    def loss(self, model, x, codes):
        with torch.no_grad():
            hidden, clean = model.encode_with_features(x)
            entry = (F.normalize(hidden, dim=1), clean[self.code], self.fingerprint(x))
        value = codes[self.code].sum() * 0
        if self._memory is not None and len(self._memory[0]) >= self.memory_size:
            features, memory_codes, prints = self._memory
            similarity = fp32_matmul(entry[0], features.T)
            same_image = (entry[2][:, None] - prints[None]).abs() <= 1e-9 * prints.abs().clamp_min(1)
            nearest = similarity.masked_fill(same_image, float("-inf")).topk(self.neighbours, dim=1).indices
            target = memory_codes[nearest].mean(1)
            value = -torch.log((codes[self.code] * target).sum(1) + 1e-8).mean()
        stored = entry if self._memory is None else tuple(torch.cat(pair) for pair in zip(entry, self._memory))
        self._memory = tuple(t[: self.memory_size] for t in stored)
        return value

    def forget(self) -> None:
        self._memory = None

    def __getstate__(self) -> dict:
        # a model built in Python keeps its terms among its hyperparameters: no memory in checkpoints
        return {**vars(self), "_memory": None}
