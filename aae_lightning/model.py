"""The one LightningModule: an autoencoder whose latent codes are each matched to a prior adversarially."""

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from aae_lightning.averaging import weight_average
from aae_lightning.callbacks import ClusterGrid, LatentPlot, PriorSamples, RepresentationMap, StyleGrid
from aae_lightning.codes import LatentCode
from aae_lightning.metrics import ClusterMetrics
from aae_lightning.nets import Discriminator, MLPDecoder, MLPEncoder
from aae_lightning.perturbations import Perturbation
from aae_lightning.terms import TrainingTerm

EncoderFactory = Callable[[Sequence[int], int], nn.Module]
DecoderFactory = Callable[[int, Sequence[int]], nn.Module]


class NonFiniteLossError(RuntimeError):
    """A training loss became NaN or Inf."""


class AdversarialAutoencoder(L.LightningModule):
    """Adversarial Autoencoder (Makhzani et al. 2015) over named latent codes.

    Each training batch runs the reconstruction phase (autoencoder optimizer, encoder + decoder)
    and then the regularization phase: the discriminator step (prior samples are real, encoder
    codes fake) and the generator step (the encoder tries to fool the discriminators).

    Args:
        codes: the latent codes by name, in the order the decoder sees them concatenated. Keyed
            by name so that one setting of one code is one command-line flag or sweep parameter
            (``--model.codes.y.prior.num_classes=30``).
        input_shape: image shape (C, H, W); linked from the DataModule by the CLI.
        num_classes: number of label classes; linked from the DataModule by the CLI. 0: the data
            has no labels (a flat folder of images): no metrics need them, figures still drawn.
        encoder: factory ``(input_shape, out_dim) -> nn.Module``; default an MLP of 2 x 1000 units.
        decoder: factory ``(in_dim, output_shape) -> nn.Module`` returning logits; default MLP.
        discriminator_hidden: hidden widths of every code's discriminator.
        recon_loss: ``bce`` (images in [0, 1], sigmoid output) or ``mse``.
        lr: learning rate of the autoencoder (reconstruction) optimizer.
        lr_discriminator: learning rate of the discriminators' optimizer.
        lr_generator: learning rate of the encoder-as-generator optimizer.
        betas: Adam betas of all three optimizers (a low beta1 steadies the adversarial game).
        lr_milestones: epochs at which all learning rates are multiplied by ``lr_gamma``.
        lr_gamma: the decay factor at each milestone.
        discriminator_noise: std of Gaussian noise added to every discriminator input, real and
            fake; it blurs the gap between one-hot prior samples and soft encoder outputs.
        input_noise: std of Gaussian noise added to the encoder's input while training (a
            denoising autoencoder; the paper uses 0.3 for its semi-supervised MNIST model).
        reconstruction_perturbation: opt-in, beyond the paper: the reconstruction phase encodes
            a randomly mapped copy of each image (e.g. a small :class:`~aae_lightning.RandomAffine`),
            before the input noise, and the decoder must draw the image itself: a denoising
            autoencoder whose noise is geometric, so the encoder must undo the map.
        cluster_code: the categorical code scored against the labels with purity, Hungarian
            accuracy, NMI and ARI; default the first code with a categorical prior.
        terms: opt-in, beyond the paper: extra losses by name, each a
            :class:`~aae_lightning.terms.TrainingTerm` with its weight (balance, mutual
            information, consistency under a perturbation), added to the phase it names. Keyed
            by name as the codes are: one flag or sweep parameter changes one term
            (``--model.terms.contrast.weight=2``), and each logs ``train/terms/<name>``. Empty:
            the paper's method.
        supervised_code: turns on the semi-supervised phase (paper sec. 5): after the
            regularization phase, cross-entropy between this categorical code's q(y|x) and the
            labels of a labelled batch (the DataModule's ``num_labeled`` images, or the labelled
            rows of the batch). It logs ``val/error`` and ``test/error``.
        lr_supervised: learning rate of that phase. It has its own Adam over the encoder, a
            fourth optimizer that exists only with the phase: sharing the generator's would mix
            the moment estimates of two different losses.
        supervised_perturbation: opt-in, beyond the paper: the labelled images of that phase
            are perturbed afresh at every step (e.g. :class:`~aae_lightning.RandomAffine`), so
            a hundred labels stand for many more images.
        lr_heads: learning rate of learned cluster heads (codes with ``added_to``), default ``lr``:
            Adam moves a weight by about its learning rate per step, and heads live on the scale
            of the prior (units), not of a weight.
        figures_every_n_epochs: how often the figures that follow from the codes are drawn (to
            W&B and as PNG files; see ``configure_callbacks``); 0: none.
    """

    def __init__(
        self,
        codes: dict[str, LatentCode],
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        encoder: EncoderFactory | None = None,
        decoder: DecoderFactory | None = None,
        discriminator_hidden: Sequence[int] = (1000, 1000),
        recon_loss: Literal["bce", "mse"] = "bce",
        lr: float = 1e-4,
        lr_discriminator: float = 1e-4,
        lr_generator: float = 1e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        lr_milestones: Sequence[int] = (),
        lr_gamma: float = 0.1,
        discriminator_noise: float = 0.0,
        input_noise: float = 0.0,
        reconstruction_perturbation: Perturbation | None = None,
        cluster_code: str | None = None,
        terms: Mapping[str, TrainingTerm] | None = None,
        supervised_code: str | None = None,
        lr_supervised: float = 1e-3,
        supervised_perturbation: Perturbation | None = None,
        lr_heads: float | None = None,
        figures_every_n_epochs: int = 5,
    ):
        super().__init__()
        if not codes:
            raise ValueError("AdversarialAutoencoder: give at least one latent code")
        names = list(codes)
        for name, c in codes.items():
            if not name.isidentifier():
                raise ValueError(f"AdversarialAutoencoder: a code's name must be an identifier such as 'y' or 'z', got {name!r}")
            if c.added_to == name:
                raise ValueError(f"AdversarialAutoencoder: code {name!r} has added_to={name!r}, which must name another code")
            c.name = name
        self.codes = list(codes.values())
        lr_heads = lr if lr_heads is None else lr_heads
        for name, value in (("lr", lr), ("lr_discriminator", lr_discriminator), ("lr_generator", lr_generator), ("lr_supervised", lr_supervised),
                            ("lr_heads", lr_heads)):
            if value <= 0:
                raise ValueError(f"AdversarialAutoencoder: {name} must be > 0, got {value}")
        for name, value in (("discriminator_noise", discriminator_noise), ("input_noise", input_noise)):
            if value < 0:
                raise ValueError(f"AdversarialAutoencoder: {name} must be >= 0, got {value}")
        if not any(c.inferred for c in self.codes):
            raise ValueError("AdversarialAutoencoder: at least one code must come from the encoder (source='encoder')")
        for c in self.codes:
            parts = c.prior.num_classes if not c.inferred else c.prior.num_parts if c.conditioned else num_classes
            if parts != num_classes:
                raise ValueError(
                    f"AdversarialAutoencoder: code {c.name!r} ({'taken from the label' if not c.inferred else 'label-conditioned'}) "
                    f"has a prior with {parts} parts but the data has {num_classes} classes: {c.prior!r}"
                )
        inferred = [c.name for c in self.codes if c.inferred]
        categorical = [c.name for c in self.codes if c.prior.num_classes and c.inferred]
        if cluster_code is not None and cluster_code not in categorical:
            raise ValueError(f"AdversarialAutoencoder: cluster_code={cluster_code!r} is not one of the inferred categorical codes {categorical}")
        if supervised_code is not None:
            if num_classes == 0:
                raise ValueError(f"AdversarialAutoencoder: supervised_code={supervised_code!r} needs labelled data, but the data has no labels")
            if supervised_code not in categorical:
                raise ValueError(f"AdversarialAutoencoder: supervised_code={supervised_code!r} is not one of the inferred categorical codes {categorical}")
            if self.code_dim(supervised_code) != num_classes:
                raise ValueError(f"AdversarialAutoencoder: supervised_code={supervised_code!r} must have one category per class ({num_classes})")
        by_name = {c.name: c for c in self.codes}
        for c in self.codes:
            if c.added_to is None:
                continue
            target = by_name.get(c.added_to)
            if target is None or target.added_to is not None:
                raise ValueError(f"AdversarialAutoencoder: code {c.name!r} is added_to={c.added_to!r}, which must be another code "
                                 f"that is not itself added to one; codes: {names}")
            if not c.learned_heads and c.dim != target.dim:
                raise ValueError(f"AdversarialAutoencoder: code {c.name!r} has fixed heads (W = head_scale x I), which needs "
                                 f"{c.added_to!r} of the same size ({c.dim}), got {target.dim}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.encoder = (encoder or MLPEncoder)(self.input_shape, sum(c.dim for c in self.codes if c.inferred))
        self.decoder = (decoder or MLPDecoder)(sum(c.dim for c in self.codes if c.added_to is None), self.input_shape)
        # a code added to another one reaches the decoder through its heads W (rows: one per
        # category), learned with the autoencoder or fixed to scale x I
        self.heads = nn.ParameterDict({c.name: nn.Parameter(c.head_scale * torch.randn(c.dim, by_name[c.added_to].dim))
                                       for c in self.codes if c.added_to is not None and c.learned_heads})
        for c in self.codes:
            if c.added_to is not None and not c.learned_heads:
                self.register_buffer(f"fixed_heads_{c.name}", c.head_scale * torch.eye(c.dim))
        # a conditioned discriminator also sees the label: one-hot over the classes plus "unlabelled"
        self.discriminators = nn.ModuleDict({
            c.name: Discriminator(c.dim + (num_classes + 1 if c.conditioned else 0), discriminator_hidden)
            for c in self.codes if c.inferred
        })
        self.recon_loss = recon_loss
        self.lr, self.lr_discriminator, self.lr_generator = lr, lr_discriminator, lr_generator
        self.lr_heads = lr_heads
        self.betas = tuple(betas)
        self.lr_milestones, self.lr_gamma = list(lr_milestones), lr_gamma
        self.discriminator_noise = discriminator_noise
        self.input_noise = input_noise
        if reconstruction_perturbation is not None and reconstruction_perturbation.uses_predict:
            raise ValueError(f"AdversarialAutoencoder: reconstruction_perturbation must be a random map such as RandomAffine, "
                             f"not one drawn against a code: {reconstruction_perturbation!r}")
        self.reconstruction_perturbation = reconstruction_perturbation
        self.cluster_code = cluster_code or (categorical[0] if categorical else None)
        if terms is not None and not isinstance(terms, Mapping):
            raise ValueError("AdversarialAutoencoder: terms are keyed by name, e.g. {'consistency': Consistency(...)} in Python or "
                             f"'consistency: {{class_path: aae_lightning.Consistency, ...}}' in YAML; got {type(terms).__name__} {terms!r}")
        self.terms = dict(terms or {})
        for name, term in self.terms.items():
            if not name.isidentifier():
                raise ValueError(f"AdversarialAutoencoder: a term's name must be an identifier such as 'consistency', got {name!r}")
            # what jsonargparse builds from a setting of a name the config lacks (a misspelling)
            if type(term) is TrainingTerm:
                others = ", ".join(n for n, t in self.terms.items() if type(t) is not TrainingTerm) or "none"
                raise ValueError(f"AdversarialAutoencoder: term {name!r} has no class of its own (the other terms: {others}); "
                                 f"a new term needs one, e.g. --model.terms.{name}.class_path=aae_lightning.Consistency")
            term.code = term.code or self.cluster_code
            if term.code not in categorical:
                raise ValueError(f"AdversarialAutoencoder: {term!r} needs one of the inferred categorical codes {categorical}")
            if term.needs_heads and by_name[term.code].added_to is None:
                raise ValueError(f"AdversarialAutoencoder: {term!r} needs cluster heads: give code {term.code!r} added_to")
            unknown = [name for name in term.codes_read if name not in inferred]
            if unknown:
                raise ValueError(f"AdversarialAutoencoder: {term!r} reads codes {unknown}, which are not inferred codes {inferred}")
        self.supervised_code, self.lr_supervised = supervised_code, lr_supervised
        self.supervised_perturbation = supervised_perturbation
        # the codes that the terms of the running phase share (see perturbed_codes, averaged_codes); None outside one
        self._phase_codes: dict[tuple[str, ...], dict[str, torch.Tensor]] | None = None
        if figures_every_n_epochs < 0:
            raise ValueError(f"AdversarialAutoencoder: figures_every_n_epochs must be >= 0, got {figures_every_n_epochs}")
        self.figures_every_n_epochs = figures_every_n_epochs
        if self.cluster_code is not None and num_classes > 0:
            self.cluster_metrics = nn.ModuleDict({s: ClusterMetrics(self.code_dim(self.cluster_code), num_classes, f"{s}/") for s in ("val", "test")})
        if supervised_code is not None:
            self.accuracy = nn.ModuleDict({s: MulticlassAccuracy(num_classes, average="micro") for s in ("val", "test")})

    # ---- the model ------------------------------------------------------------------------
    def code_dim(self, name: str) -> int:
        """The size of the named code (its number of categories, for a categorical one)."""
        return next(c.dim for c in self.codes if c.name == name)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Image batch -> {code name: code}, each code in its prior's space. Codes taken from the
        label are included when ``labels`` are given (all known: no -1)."""
        inferred = [c for c in self.codes if c.inferred]
        # under bf16 autocast the nets' matrix products run in bf16; the codes (softmax, the
        # terms' logarithms, the discriminators' inputs) stay in fp32
        raw = self.encoder(x).float().split([c.dim for c in inferred], dim=1)
        codes = {c.name: c.prior.activate(r) for c, r in zip(inferred, raw)}
        if labels is not None:
            for c in self.codes:
                if not c.inferred:
                    codes[c.name] = F.one_hot(labels, c.dim).to(x.dtype)
        return codes

    def encode_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the encoder's last hidden layer, the codes) of a batch: the hidden layer is the input
        of the encoder's output layer (its last module without children)."""
        seen: list[torch.Tensor] = []
        handle = self.encoder_output_layer().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
        try:
            codes = self.encode(x)
        finally:
            handle.remove()
        return seen[0].flatten(1).float(), codes

    def encoder_output_layer(self) -> nn.Module:
        """The encoder's last module without children: the layer that gives the raw codes."""
        return [m for m in self.encoder.modules() if not list(m.children())][-1]

    def code_logit_rows(self, name: str) -> slice:
        """Where the named inferred code's raw values lie among the encoder's outputs."""
        start = 0
        for c in self.codes:
            if c.name == name:
                return slice(start, start + c.dim)
            start += c.dim if c.inferred else 0
        raise ValueError(f"AdversarialAutoencoder: no code named {name!r}")

    def decoder_input_columns(self, name: str) -> slice | None:
        """Where the named code lies in the decoder's input; None for a code added to another."""
        start = 0
        for c in self.codes:
            if c.added_to is None:
                if c.name == name:
                    return slice(start, start + c.dim)
                start += c.dim
        return None

    def head_matrix(self, name: str) -> torch.Tensor:
        """W of a code that is added to another one: one row (head) per category."""
        return self.heads[name] if name in self.heads else getattr(self, f"fixed_heads_{name}")

    def decoder_parts(self, codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What the decoder sees, by code: each code with ``added_to`` enters the other as W code + other."""
        parts = {c.name: codes[c.name] for c in self.codes if c.added_to is None}
        for c in self.codes:
            if c.added_to is not None:
                parts[c.added_to] = parts[c.added_to] + codes[c.name] @ self.head_matrix(c.name)
        return parts

    def decoder_input(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's parts side by side."""
        return torch.cat(list(self.decoder_parts(codes).values()), dim=1)

    def decode_logits(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decoder(self.decoder_input(codes)).float()

    def decode(self, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Codes -> images in the data's scale."""
        logits = self.decode_logits(codes)
        return torch.sigmoid(logits) if self.recon_loss == "bce" else logits

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.encode(x)

    def sample_prior(self, n: int) -> dict[str, torch.Tensor]:
        return {c.name: c.prior.sample(n, device=self.device) for c in self.codes}

    def reconstruction_loss(self, x: torch.Tensor, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.decode_logits(codes)
        if self.recon_loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, x)
        return F.mse_loss(logits, x)

    def _discriminator_input(self, c: LatentCode, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.discriminator_noise > 0:
            code = code + torch.randn_like(code) * self.discriminator_noise
        if c.conditioned:
            # -1 (unlabelled) becomes the extra last slot
            slot = torch.where(labels >= 0, labels, self.num_classes)
            code = torch.cat([code, F.one_hot(slot, self.num_classes + 1).to(code.dtype)], dim=1)
        return code

    def _discriminate(self, c: LatentCode, code: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.discriminators[c.name](self._discriminator_input(c, code, labels)).float()

    def _prior_sample(self, c: LatentCode, labels: torch.Tensor) -> torch.Tensor:
        n, device = labels.shape[0], labels.device
        if not c.conditioned:
            return c.prior.sample(n, device=device)
        # labelled rows are matched to their class's part of the prior, unlabelled ones to all of it
        return torch.where((labels >= 0)[:, None], c.prior.sample(n, device, labels=labels.clamp(min=0)), c.prior.sample(n, device))

    def discriminator_loss(self, codes: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over codes of the real/fake BCE, and the mean accuracy of the discriminators."""
        losses, accuracies = [], []
        for c in self.codes:
            if not c.inferred:
                continue
            real = self._discriminator_input(c, self._prior_sample(c, labels), labels)
            fake = self._discriminator_input(c, codes[c.name].detach(), labels)
            # real and fake in one pass: one matrix product per layer, and under bf16 one cast of its
            # weights (1.1x the bf16 step, benchmarks/throughput.py)
            real_logit, fake_logit = self.discriminators[c.name](torch.cat([real, fake])).float().chunk(2)
            losses.append(
                F.binary_cross_entropy_with_logits(real_logit, torch.ones_like(real_logit))
                + F.binary_cross_entropy_with_logits(fake_logit, torch.zeros_like(fake_logit))
            )
            accuracies.append(((real_logit > 0).float().mean() + (fake_logit < 0).float().mean()) / 2)
        return torch.stack(losses).sum(), torch.stack(accuracies).mean()

    def generator_loss(self, codes: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        losses = []
        for c in self.codes:
            if not c.inferred:
                continue
            logit = self._discriminate(c, codes[c.name], labels)
            losses.append(c.weight * F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit)))
        return torch.stack(losses).sum()

    def term_losses(self, x: torch.Tensor, codes: dict[str, torch.Tensor], phase: str) -> dict[str, tuple[float, torch.Tensor]]:
        """{name: (weight, unweighted loss)} of the extra terms that join ``phase``."""
        self._phase_codes = {}
        try:
            return {name: (term.weight, term.loss(self, x, codes)) for name, term in self.terms.items()
                    if term.phase == phase and self.global_step >= term.start_step}
        finally:
            self._phase_codes = None

    def perturbed_codes(self, perturbation: Perturbation, x: torch.Tensor, code: str) -> dict[str, torch.Tensor]:
        """Every inferred code of ``perturbation(x)``, with gradients to the encoder; an adversarial
        perturbation is drawn against ``code``. Within one phase, terms with equal perturbations
        (same class and settings; for an adversarial one, the same code too) share one draw and
        one encoder pass: the copy costs a full forward and backward through the encoder."""
        def predict(images):
            return self.encode(images)[code]

        key = ("perturbed", repr(perturbation), code if perturbation.uses_predict else "")
        return self._shared_in_phase(key, lambda: self.encode(perturbation(x, predict)))

    def averaged_codes(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every inferred code of ``x`` under the :class:`~aae_lightning.EMAWeights` callback's
        average of the weights, in eval mode (batch norm from its running statistics), without
        gradients. Within one phase the terms that read it share one pass."""
        def encode_averaged():
            teacher = weight_average(self._trainer).averaged_module
            was_training = teacher.training
            teacher.eval()
            try:
                with torch.no_grad():
                    return teacher.encode(x)
            finally:
                teacher.train(was_training)

        return self._shared_in_phase(("weight_average",), encode_averaged)

    def _shared_in_phase(self, key: tuple[str, ...], compute) -> dict[str, torch.Tensor]:
        """``compute()``, kept for the rest of the phase running its terms (computed afresh outside one)."""
        if self._phase_codes is None:
            return compute()
        if key not in self._phase_codes:
            self._phase_codes[key] = compute()
        return self._phase_codes[key]

    def perturbed_code(self, perturbation: Perturbation, x: torch.Tensor, code: str) -> torch.Tensor:
        """q(code | perturbation(x)): :meth:`perturbed_codes`' entry for ``code``."""
        return self.perturbed_codes(perturbation, x, code)[code]

    def supervised_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        q = self.encode(x)[self.supervised_code]
        return F.nll_loss(torch.log(q + 1e-8), labels)

    # ---- training -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Each batch runs three backward passes, each reaching only its own optimizer's
        # parameters. Plain DDP waits for every parameter's gradient in every pass and fails;
        # with find_unused_parameters the others are marked ready (Lightning prepares the reducer
        # before each manual_backward). The strategy wraps the model after this hook.
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs["find_unused_parameters"] = True
        needing = [term for term in self.terms.values() if term.needs_weight_average]
        if stage == "fit" and needing and weight_average(self._trainer) is None:
            raise ValueError(f"{needing[0]!r} takes its targets from the weight average: add "
                             "aae_lightning.EMAWeights to trainer.callbacks")

    @contextmanager
    def _phase(self, optimizer) -> Iterator[None]:
        """Only ``optimizer``'s parameters take gradients inside; it steps on exit."""
        self.toggle_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        yield
        optimizer.step()
        self.untoggle_optimizer(optimizer)

    def _check_finite(self, losses: dict[str, torch.Tensor], batch_idx: int, step: int) -> None:
        # one host sync per step, before anything (a checkpoint among them) can see the weights
        values = torch.stack(list(losses.values()))
        if not torch.isfinite(values).all():
            phase, value = next((p, v.item()) for p, v in losses.items() if not torch.isfinite(v))
            raise NonFiniteLossError(
                f"{phase} loss is {value} at batch {batch_idx} of epoch {self.current_epoch} "
                f"(global step {step}); "
                "training stopped. Lower the learning rates or check the input data."
            )

    def _corrupt(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x) * self.input_noise if self.input_noise > 0 else x

    def _split_batch(self, batch):
        """(images, labels with -1 where unknown, labelled (images, labels) or None).

        With ``num_labeled`` the DataModule sends {"all": ..., "labeled": ...}; otherwise the
        batch's own labelled rows serve the supervised phase."""
        if isinstance(batch, dict):
            x, labels = batch["all"]
            return x, labels, batch["labeled"]
        x, labels = batch
        if self.supervised_code is None:
            return x, labels, None
        known = labels >= 0
        return x, labels, (x[known], labels[known])

    def training_step(self, batch, batch_idx):
        x, labels, labeled = self._split_batch(batch)
        if len(x) < 2 and any(isinstance(m, nn.BatchNorm1d) for m in self.encoder.modules()):
            raise ValueError(f"the encoder batch-normalises its hidden layers, which needs training batches of 2 or more "
                             f"images; got a batch of {len(x)} (raise data.batch_size or set batch_norm: false)")
        opt_ae, opt_d, opt_g, *opt_supervised = self.optimizers()
        step = self.global_step
        if any(not c.inferred for c in self.codes) and bool((labels < 0).any()):
            raise ValueError("a code is taken from the label, but the batch has unlabelled images: unset num_labeled")

        with self._phase(opt_ae):
            seen = x if self.reconstruction_perturbation is None else self.reconstruction_perturbation(x, None)
            recon_codes = self.encode(self._corrupt(seen), labels)
            recon = self.reconstruction_loss(x, recon_codes)
            term_losses = self.term_losses(x, recon_codes, "reconstruction")
            self.manual_backward(recon + sum(w * value for w, value in term_losses.values()))

        # One encoder pass serves both regularization steps: the discriminator sees it detached,
        # the generator backpropagates through the freshly updated discriminators into it.
        codes = self.encode(self._corrupt(x))
        with self._phase(opt_d):
            d_loss, d_acc = self.discriminator_loss(codes, labels)
            self.manual_backward(d_loss)
        with self._phase(opt_g):
            g_loss = self.generator_loss(codes, labels)
            generator_terms = self.term_losses(x, codes, "generator")
            g_loss = g_loss + sum(w * value for w, value in generator_terms.values())
            self.manual_backward(g_loss)
        term_losses.update(generator_terms)
        losses = {"reconstruction": recon, "discriminator": d_loss, "generator": g_loss}

        if opt_supervised and labeled is not None and len(labeled[1]):
            with self._phase(opt_supervised[0]):
                images = labeled[0]
                if self.supervised_perturbation is not None:
                    images = self.supervised_perturbation(images, lambda v: self.encode(v)[self.supervised_code])
                losses["supervised"] = self.supervised_loss(self._corrupt(images), labeled[1])
                self.manual_backward(losses["supervised"])
        self._check_finite(losses, batch_idx, step)

        self.log_dict(
            {"train/recon_loss": recon, "train/d_loss": d_loss, "train/g_loss": g_loss, "train/d_accuracy": d_acc},
            on_step=True, on_epoch=True, prog_bar=True,
        )
        if "supervised" in losses:
            self.log("train/supervised_loss", losses["supervised"], on_step=True, on_epoch=True)
        if term_losses:
            self.log_dict({f"train/terms/{name}": value for name, (_, value) in term_losses.items()}, on_step=True, on_epoch=True)

    # The noise and prior draws come from torch's global generator: checkpoints keep its state so a
    # resumed run draws what the uninterrupted one would. It is put back when training starts, after
    # the sanity check's validation.
    def on_save_checkpoint(self, checkpoint):
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint):
        self._rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self):
        states = getattr(self, "_rng_states_to_restore", None)
        if states:
            torch.set_rng_state(states["torch"])
            if "cuda" in states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
        self._rng_states_to_restore = None

    def on_train_epoch_end(self):
        for scheduler in self.lr_schedulers() or []:
            scheduler.step()

    def _shared_eval_step(self, batch, stage: str) -> dict[str, torch.Tensor]:
        x, labels = batch
        codes = self.encode(x, labels if self.num_classes > 0 else None)
        self.log(f"{stage}/recon_loss", self.reconstruction_loss(x, codes), on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        if hasattr(self, "cluster_metrics"):
            self.cluster_metrics[stage].update(codes[self.cluster_code], labels)
        if self.supervised_code is not None:
            self.accuracy[stage].update(codes[self.supervised_code], labels)
        return {"codes": codes, "labels": labels}

    def _log_epoch_metrics(self, stage: str) -> None:
        if hasattr(self, "cluster_metrics"):
            metrics = self.cluster_metrics[stage]
            self.log_dict(metrics.compute(), prog_bar=stage == "val")
            metrics.reset()
        if self.supervised_code is not None:
            self.log(f"{stage}/error", 1 - self.accuracy[stage].compute(), prog_bar=True)
            self.accuracy[stage].reset()

    def on_validation_epoch_end(self):
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self):
        self._log_epoch_metrics("test")

    def validation_step(self, batch, batch_idx):
        return self._shared_eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._shared_eval_step(batch, "test")

    def predict_step(self, batch, batch_idx):
        x, labels, index = batch
        # codes taken from the label exist only where every label is known
        return {"codes": self.encode(x, labels if bool((labels >= 0).all()) else None), "labels": labels, "index": index}

    def monitor_metric(self) -> tuple[str, str]:
        """The headline validation metric and its direction: what the best checkpoint keeps."""
        if self.supervised_code is not None:
            return "val/error", "min"
        if hasattr(self, "cluster_metrics"):
            return "val/purity", "max"
        return "val/recon_loss", "min"

    def configure_callbacks(self):
        """The figures that follow from the codes: a continuous code's scatter, a cluster code's
        sizes and grid, a map's heads, samples from the priors, and a categorical code against
        the styles. A figure callback the trainer already has (from a config) is left as it is."""
        n = self.figures_every_n_epochs
        if n == 0:
            return []
        wanted = [PriorSamples(every_n_epochs=n)]
        if any(not c.prior.num_classes for c in self.codes) or self.cluster_code is not None:
            wanted.append(LatentPlot(every_n_epochs=n))
        if self.cluster_code is not None:
            wanted.append(ClusterGrid(every_n_epochs=n))
        if any(c.prior.num_classes for c in self.codes):
            wanted.append(StyleGrid(every_n_epochs=n))
        if any(c.added_to is not None for c in self.codes):
            wanted.append(RepresentationMap(every_n_epochs=n))
        present = {type(cb) for cb in self.trainer.callbacks} if self._trainer is not None else set()
        return [cb for cb in wanted if type(cb) not in present]

    def configure_optimizers(self):
        # fused Adam (one kernel over all parameters) under bf16, where it makes the step 1.25x
        # faster on a CPU (benchmarks/throughput.py); in fp32 it gains nothing, and the default
        # keeps fp32 runs as they were
        bf16 = self._trainer is not None and "bf16" in str(self.trainer.precision)
        adam = partial(torch.optim.Adam, betas=self.betas, fused=bf16 and self.device.type in ("cpu", "cuda"))
        encoder = list(self.encoder.parameters())
        optimizers = [
            adam([{"params": encoder + list(self.decoder.parameters())}, {"params": list(self.heads.parameters()), "lr": self.lr_heads}], lr=self.lr),
            adam(self.discriminators.parameters(), lr=self.lr_discriminator),
            adam(encoder, lr=self.lr_generator),
        ]
        if self.supervised_code is not None:
            optimizers.append(adam(encoder, lr=self.lr_supervised))
        if not self.lr_milestones:
            return optimizers
        schedulers = [torch.optim.lr_scheduler.MultiStepLR(o, self.lr_milestones, self.lr_gamma) for o in optimizers]
        return optimizers, schedulers
