import copy
from functools import partial

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from aae_lightning import AdversarialAutoencoder, CategoricalPrior, GaussianMixturePrior, GaussianPrior, LatentCode, VirtualAdversarial
from aae_lightning.data import TensorBatches
from aae_lightning.nets import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, VGGEncoder
from aae_lightning.perturbations import Perturbation
from conftest import structured_images


def small_model(codes, **kwargs):
    defaults = dict(
        encoder=partial(MLPEncoder, hidden=(256, 256)),
        decoder=partial(MLPDecoder, hidden=(256, 256)),
        discriminator_hidden=(128, 128),
        lr=1e-3, lr_discriminator=5e-4, lr_generator=5e-4,
    )
    return AdversarialAutoencoder(codes, **{**defaults, **kwargs})


def synthetic(n=2000, seed=0):
    images, labels = structured_images(n, seed=seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels).long()


class OptimizerAudit(L.Callback):
    """Checks, around every optimizer step of the first batches, which parameters changed."""

    def __init__(self, steps=30):
        self.steps, self.violations, self.audited = steps, [], 0

    def on_train_start(self, trainer, pl_module):
        names = {p: n for n, p in pl_module.named_parameters()}
        for opt in trainer.optimizers:
            owned = {id(p) for group in opt.param_groups for p in group["params"]}
            snapshot = {}

            def before(optimizer, args, kwargs, snapshot=snapshot):
                snapshot.clear()
                if self.audited < self.steps:
                    snapshot.update({p: p.detach().clone() for p in names})

            def after(optimizer, args, kwargs, snapshot=snapshot, owned=owned):
                if snapshot:
                    self.audited += 1
                    changed = {names[p] for p, old in snapshot.items() if not torch.equal(p, old)}
                    strays = {n for n in changed if id(dict(pl_module.named_parameters())[n]) not in owned}
                    if strays or not changed:
                        self.violations.append((optimizer, sorted(strays), len(changed)))

            opt.register_step_pre_hook(before)
            opt.register_step_post_hook(after)


def reconstruction_mse(model, x):
    with torch.no_grad():
        return torch.mean((model.decode(model.encode(x)) - x) ** 2).item()


def test_basic_aae_learns_and_matches_the_prior():
    torch.manual_seed(0)
    x, y = synthetic()
    model = small_model({"z": LatentCode(GaussianPrior(dim=4))})
    before = reconstruction_mse(model, x)
    audit = OptimizerAudit()
    trainer = L.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[audit])
    trainer.fit(model, TensorBatches((x, y), 100, shuffle=True))
    after = reconstruction_mse(model, x)
    assert after < 0.35 * before, (before, after)
    z = model.encode(x)["z"].detach()
    # the aggregated posterior has moved onto N(0, I)
    assert z.mean(0).abs().max() < 0.35, z.mean(0)
    assert ((z.std(0) - 1).abs() < 0.35).all(), z.std(0)
    assert audit.audited == 30 and not audit.violations, audit.violations


def test_each_phase_updates_only_its_own_parameters():
    torch.manual_seed(0)
    x, y = synthetic(200)
    model = small_model({"y": LatentCode(CategoricalPrior(4)), "z": LatentCode(GaussianPrior(3))})
    audit = OptimizerAudit(steps=9)
    trainer = L.Trainer(max_steps=9, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[audit])
    trainer.fit(model, TensorBatches((x, y), 50, shuffle=True))
    assert audit.audited == 9 and not audit.violations, audit.violations
    # the discriminators are never touched by the encoder's optimizers and vice versa
    ae, d, g = (o.param_groups[0]["params"] for o in trainer.optimizers)
    assert {id(p) for p in d}.isdisjoint({id(p) for p in ae + g})
    assert {id(p) for p in g} == {id(p) for p in model.encoder.parameters()}


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_vgg_encoder_pools_each_block_and_feeds_its_hidden_layer_to_the_codes(shape):
    encoder = partial(VGGEncoder, channels=(4, 8, 16), hidden=24, convs_per_block=2)
    model = small_model({"y": LatentCode(CategoricalPrior(5)), "z": LatentCode(GaussianPrior(3))}, encoder=encoder,
                        decoder=partial(MLPDecoder, hidden=(32,)), input_shape=shape)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.encoder.modules()) == 6
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in model.encoder.modules()) == 3
    hidden, codes = model.encode_with_features(torch.rand(7, *shape))
    assert hidden.shape == (7, 24) and codes["y"].shape == (7, 5) and codes["z"].shape == (7, 3)
    assert torch.allclose(codes["y"].sum(1), torch.ones(7))


@pytest.mark.parametrize("encoder", [VGGEncoder, ConvEncoder])
def test_channels_last_encoders_compute_what_the_contiguous_ones_do(encoder):
    torch.manual_seed(0)
    fast = encoder((1, 28, 28), 12, channels=(4, 8, 16), hidden=24)
    plain = encoder((1, 28, 28), 12, channels=(4, 8, 16), hidden=24, channels_last=False)
    convs = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not any(w.is_contiguous() for w in convs[1:])  # the first, of one input channel, is both layouts at once
    plain.load_state_dict(fast.state_dict())  # checkpoints move between the layouts
    x = torch.rand(6, 1, 28, 28, requires_grad=True)
    out_fast, out_plain = fast(x), plain(x)
    assert torch.allclose(out_fast, out_plain, atol=1e-5)
    (grad_fast,) = torch.autograd.grad(out_fast.square().sum(), x)
    (grad_plain,) = torch.autograd.grad(out_plain.square().sum(), x)
    assert torch.allclose(grad_fast, grad_plain, atol=1e-5)


@pytest.mark.parametrize(
    "encoder, message",
    [
        (partial(VGGEncoder, convs_per_block=0), "VGGEncoder: convs_per_block must be >= 1, got 0"),
        (partial(VGGEncoder, channels=()), r"VGGEncoder: channels must be one or more positive widths, got \[\]"),
        (partial(ConvEncoder, channels=(8, 0)), r"ConvEncoder: channels must be one or more positive widths, got \[8, 0\]"),
        (partial(ConvEncoder, channels=(4, 4, 4, 4, 4)), "5 blocks need an image of at least 32x32 pixels, got 28x28; give at most 4 channels"),
    ],
)
def test_conv_encoders_that_cannot_be_built_are_named(encoder, message):
    with pytest.raises(ValueError, match=message):
        encoder((1, 28, 28), 8)


def test_a_conv_decoder_that_cannot_draw_the_image_is_named():
    with pytest.raises(ValueError, match=r"ConvDecoder: 3 blocks cannot draw a 28x28 image \(they would draw 24x24\); give at most 2 channels"):
        ConvDecoder(8, (1, 28, 28), channels=(16, 8, 4))
    with pytest.raises(ValueError, match=r"cannot draw a 27x28 image \(they would draw 24x28\); an odd side needs the MLPDecoder"):
        ConvDecoder(8, (1, 27, 28), channels=(16, 8))
    with pytest.raises(ValueError, match=r"ConvDecoder: channels must be one or more positive widths, got \[\]"):
        ConvDecoder(8, (1, 28, 28), channels=())
    with pytest.raises(ValueError, match=r"ConvDecoder: 3 blocks need an image of at least 8x8 pixels, got 4x4; give at most 2 channels"):
        ConvDecoder(8, (1, 4, 4), channels=(16, 8, 4))
    assert ConvDecoder(8, (1, 28, 28), channels=(16, 8), hidden=24)(torch.rand(3, 8)).shape == (3, 1, 28, 28)


def test_only_the_conv_decoders_last_block_skips_batch_norm():
    # a middle width equal to the image's channel count once passed for the output layer
    decoder = ConvDecoder(8, (1, 28, 28), channels=(16, 1), hidden=24)
    assert [type(layer).__name__ for layer in decoder.deconv] == ["ConvTranspose2d", "FullPrecisionBatchNorm2d", "ReLU",
                                                                   "FullPrecisionConvTranspose2d"]


def test_codes_are_split_and_activated_by_their_priors():
    model = small_model({"y": LatentCode(CategoricalPrior(5)), "z": LatentCode(GaussianPrior(3))})
    codes = model.encode(torch.rand(7, 1, 28, 28))
    assert codes["y"].shape == (7, 5) and torch.allclose(codes["y"].sum(1), torch.ones(7))
    assert codes["z"].shape == (7, 3)
    assert model.decode(codes).shape == (7, 1, 28, 28)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=0), "lr must be > 0"),
        (dict(lr_discriminator=-1), "lr_discriminator must be > 0"),
        (dict(discriminator_noise=-0.1), "discriminator_noise must be >= 0"),
        (dict(reconstruction_perturbation=VirtualAdversarial()), "reconstruction_perturbation must be a random map"),
    ],
)
def test_invalid_model_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small_model({"z": LatentCode(GaussianPrior(2))}, **kwargs)


@pytest.mark.parametrize("name, added_to, message", [("my code", None, "must be an identifier"), ("z", "z", "must name another code")])
def test_bad_code_names_are_rejected(name, added_to, message):
    with pytest.raises(ValueError, match=message):
        small_model({name: LatentCode(CategoricalPrior(10), added_to=added_to)})


def test_codes_take_their_names_from_their_keys_in_order():
    model = small_model({"style": LatentCode(GaussianPrior(3)), "digit": LatentCode(CategoricalPrior(10))})
    assert [c.name for c in model.codes] == ["style", "digit"]
    codes = model.encode(torch.rand(4, 1, 28, 28))
    assert codes["style"].shape == (4, 3) and codes["digit"].shape == (4, 10)
    assert model.cluster_code == "digit"


def test_non_finite_loss_stops_training_naming_the_phase_and_step():
    from aae_lightning.model import NonFiniteLossError

    x, y = synthetic(200)
    x[150:] = float("nan")  # the second batch is broken
    model = small_model({"z": LatentCode(GaussianPrior(2))})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(NonFiniteLossError, match=r"reconstruction loss is nan at batch 3 of epoch 0 \(global step 9\)"):
        trainer.fit(model, TensorBatches((x, y), 50, shuffle=False))


def test_the_reconstruction_phase_encodes_the_mapped_image_and_draws_the_image_itself():
    class Inverted(Perturbation):
        def __call__(self, x, predict=None):
            return 1 - x

    torch.manual_seed(0)
    x, y = synthetic(50)
    model = small_model({"y": LatentCode(CategoricalPrior(5)), "z": LatentCode(GaussianPrior(2))}, reconstruction_perturbation=Inverted())
    with torch.no_grad():  # a decoder that draws bright pixels, so that an image and its inverse lose differently
        [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear)][-1].bias.fill_(3.0)
    before = copy.deepcopy(model)
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, TensorBatches((x, y), 50, shuffle=False))
    assert torch.equal(seen[0], 1 - x) and torch.equal(seen[1], x)  # the reconstruction phase's pass, then the regularization's
    logged = trainer.callback_metrics["train/recon_loss_step"]
    with torch.no_grad():
        codes = before.encode(1 - x)
        assert logged == pytest.approx(before.reconstruction_loss(x, codes).item(), rel=1e-5)
        assert logged != pytest.approx(before.reconstruction_loss(1 - x, codes).item(), abs=0.2)  # the target is the image, not its copy


def test_batch_norm_encoder_depends_on_the_batch_in_training_only():
    torch.manual_seed(0)
    encoder = MLPEncoder((1, 28, 28), 7, hidden=(32, 32), batch_norm=True)
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in encoder.modules()) == 2
    image, others = torch.rand(1, 1, 28, 28), torch.rand(2, 15, 1, 28, 28)
    first = [encoder(torch.cat([image, o]))[0] for o in others]
    assert not torch.allclose(*first)
    encoder.eval()
    first = [encoder(torch.cat([image, o]))[0] for o in others]
    assert torch.allclose(*first)


def bf16_test_model() -> AdversarialAutoencoder:
    return small_model({"y": LatentCode(CategoricalPrior(10)), "z": LatentCode(GaussianPrior(dim=4))})


def test_bf16_mixed_keeps_output_layers_batch_norms_codes_logits_and_losses_in_fp32():
    """Under bf16 autocast the hidden layers' matrix products run in bf16; each net's output layer,
    the batch norms, the softmax, the discriminators' logits and the losses stay in fp32."""
    torch.manual_seed(0)
    x, y = synthetic()
    model = bf16_test_model()
    linears = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)]
    dtypes = []
    for layer in linears:
        layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.encode(x[:8])
        assert dtypes == [torch.bfloat16] * (len(linears) - 1) + [torch.float32]
        hidden = torch.randn(8, linears[-1].in_features).bfloat16()
        output = linears[-1](hidden)
        assert all(v.dtype == torch.float32 for v in codes.values())
        assert model.decode_logits(codes).dtype == torch.float32
        assert model._discriminate(model.codes[0], codes["y"], y[:8]).dtype == torch.float32
    assert torch.equal(output, F.linear(hidden.float(), linears[-1].weight, linears[-1].bias))  # fp32 all through
    normalised = MLPEncoder((1, 28, 28), 4, (16, 16), batch_norm=True)
    norms = [m for m in normalised.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert len(norms) == 2 and all(m(torch.randn(8, 16).bfloat16()).dtype == torch.float32 for m in norms)


# 20 epochs in bf16, emulated (about a minute) on a CPU without bf16 units: `make test-slow`
@pytest.mark.slow
def test_bf16_mixed_fit_learns():
    torch.manual_seed(0)
    x, y = synthetic()
    model = bf16_test_model()
    before = reconstruction_mse(model, x)
    trainer = L.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, precision="bf16-mixed")
    trainer.fit(model, TensorBatches((x, y), 100, shuffle=True))
    assert reconstruction_mse(model, x) < 0.5 * before


def test_discriminator_loss_scores_prior_samples_real_and_codes_fake():
    """Real and fake share one pass through each discriminator; the loss is still theirs, half by half."""
    model = small_model({"y": LatentCode(CategoricalPrior(4)),
                         "z": LatentCode(GaussianMixturePrior(num_components=4), conditioned=True)},
                        num_classes=4)
    codes = model.encode(torch.rand(6, 1, 28, 28))
    labels = torch.tensor([0, 1, -1, 3, -1, 2])
    torch.manual_seed(1)
    loss, accuracy = model.discriminator_loss(codes, labels)
    torch.manual_seed(1)
    expected, hits = 0, []
    for c in model.codes:
        real = model._discriminate(c, model._prior_sample(c, labels), labels)
        fake = model._discriminate(c, codes[c.name], labels)
        expected = expected + F.binary_cross_entropy_with_logits(real, torch.ones(6)) + F.binary_cross_entropy_with_logits(fake, torch.zeros(6))
        hits.append(((real > 0).float().mean() + (fake < 0).float().mean()) / 2)
    assert torch.allclose(loss, expected, atol=1e-6) and torch.allclose(accuracy, torch.stack(hits).mean())
