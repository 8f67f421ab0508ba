"""Training terms and perturbations against hand-checked cases."""

import math
import pickle
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from aae_lightning import (AdversarialAutoencoder, Balance, CategoricalPrior, CategoryRecovery, Consistency, EMAWeights, GaussianPrior, InstanceContrast,
                           InterpolationConsistency, LatentCode, MutualInformation, NeighbourAgreement, PairedMutualInformation, RandomAffine, RandomElastic, RandomShift, SelfLabelling, TrainingTerm,
                           VirtualAdversarial)
from aae_lightning.data import TensorBatches
from aae_lightning.perturbations import Perturbation


def model_with(*terms, k=4, **named):
    """A small model with ``terms`` (each named after its class) and the ``named`` ones."""
    terms = {type(term).__name__.lower(): term for term in terms} | named
    return AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(k)), "z": LatentCode(GaussianPrior(2))},
                                  terms=terms, discriminator_hidden=(8,))


def square_batch(n=16):
    x = torch.zeros(n, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    return x


def with_weight_average(model) -> EMAWeights:
    """An EMAWeights callback set up on ``model`` as fit sets it up: the average starts as a copy of the weights."""
    averaging = EMAWeights()
    model.trainer = L.Trainer(callbacks=[averaging], logger=False, enable_checkpointing=False, enable_progress_bar=False)
    averaging.setup(model.trainer, model, "fit")
    return averaging


def test_balance_term_spreads_a_collapsed_batch():
    term = Balance(code="y")
    collapsed = {"y": torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 8)}
    spread = {"y": torch.eye(4).repeat(2, 1) * 0.96 + 0.01}
    assert term.loss(None, None, collapsed) > term.loss(None, None, spread) + 1.0
    assert term.loss(None, None, {"y": torch.full((8, 4), 0.25)}).abs() < 1e-6  # uncertain but balanced: no cost


def test_mutual_information_term_is_minimal_for_confident_balanced_assignments():
    term = MutualInformation(code="y")
    k = 4
    confident_balanced = {"y": torch.eye(k).repeat(3, 1)}
    assert term.loss(None, None, confident_balanced).abs() < 1e-5  # log K - I(x; y) = 0
    uncertain = {"y": torch.full((12, k), 1 / k)}
    collapsed = {"y": torch.eye(k)[[0] * 12]}
    half = {"y": (torch.eye(k).repeat(3, 1) + 1 / k) / 2}
    for worse in (uncertain, collapsed):
        assert term.loss(None, None, worse) == pytest.approx(math.log(k), abs=1e-5)
    assert 0.1 < term.loss(None, None, half) < math.log(k)
    # the conditional half weighs confidence; without it, balance alone
    assert MutualInformation(code="y", conditional_weight=0).loss(None, None, uncertain).abs() < 1e-6


def test_consistency_term_is_zero_for_an_invariant_code_and_positive_otherwise():
    torch.manual_seed(0)
    term = Consistency(RandomShift(3))
    model = model_with(term)
    assert term.code == "y"  # the model's cluster code by default
    x = square_batch()
    assert term.loss(model, x, model.encode(x)) > 0
    with torch.no_grad():  # an encoder whose y ignores the image
        model.encoder[-1][-1].weight.zero_()
        model.encoder[-1][-1].bias.zero_()
    assert term.loss(model, x, model.encode(x)).abs() < 1e-6


def test_paired_mutual_information_wants_confident_balanced_agreeing_pairs():
    k = 4
    identity = RandomAffine(degrees=0, scale=(1, 1), max_shift=0)
    term = PairedMutualInformation(identity, code="y")
    x = square_batch(12)

    def pair_loss(clean, perturbed):
        # a stand-in model that gives the perturbed copies their own assignments
        return term.loss(SimpleNamespace(perturbed_code=lambda perturbation, images, code: perturbed), x, {"y": clean})

    balanced = torch.eye(k).repeat(3, 1)
    assert pair_loss(balanced, balanced).abs() < 1e-5  # log K - I(y; y') = 0
    assert pair_loss(torch.full((12, k), 1 / k), balanced) == pytest.approx(math.log(k), abs=1e-5)  # uncertain
    collapsed = torch.eye(k)[[0] * 12]
    assert pair_loss(collapsed, collapsed) == pytest.approx(math.log(k), abs=1e-5)
    torch.manual_seed(0)
    assert pair_loss(balanced, torch.eye(k)[torch.randperm(12) % k]) > 0.5  # copies land anywhere
    # the joint is symmetrised (image and copy are exchangeable), so even a fixed relabelling of the copies costs
    assert pair_loss(balanced, balanced[torch.tensor([1, 2, 3, 0] * 3)]) > 0.5
    # marginal_weight 0.5 asks agreement and confidence, not equal sizes: two clusters of 9 and 3 cost
    # log K - H(0.75, 0.25) at IIC's weight 1 and nothing at 0.5
    uneven = torch.eye(k)[[0] * 9 + [1] * 3]
    assert pair_loss(uneven, uneven) == pytest.approx(math.log(k) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25), abs=1e-5)
    term.marginal_weight = 0.5
    assert pair_loss(uneven, uneven).abs() < 1e-5
    assert pair_loss(balanced, torch.eye(k)[torch.randperm(12) % k]) > 0.5  # disagreement still costs
    with pytest.raises(ValueError, match=r"marginal_weight must lie in \[0.5, 1\]"):
        PairedMutualInformation(identity, marginal_weight=0.4)

    # gradients reach both sides of the pair: the clean codes and the encoder through the copy
    model = model_with(PairedMutualInformation(RandomShift(2)))
    codes = model.encode(x)
    clean = codes["y"].detach().requires_grad_(True)
    model.terms["pairedmutualinformation"].loss(model, x, {**codes, "y": clean}).backward()
    assert clean.grad.abs().sum() > 0 and model.encoder[-1][-1].weight.grad.abs().sum() > 0


def test_terms_with_equal_perturbations_share_one_copy_and_encoder_pass_per_phase():
    torch.manual_seed(0)
    model = model_with(Consistency(RandomAffine()), PairedMutualInformation(RandomAffine()),
                       SelfLabelling([RandomAffine(degrees=30), RandomAffine()]))
    passes = []
    model.encoder.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0]))
    x = square_batch()
    losses = model.term_losses(x, model.encode(x), "generator")
    # the clean batch, one copy for the three maps RandomAffine() (self-labelling's second among
    # them), one under degrees=30
    assert len(passes) == 3 and set(losses) == {"consistency", "pairedmutualinformation", "selflabelling"}
    assert not torch.equal(passes[1], passes[2])
    sum(value for _, value in losses.values()).backward()  # one graph: the shared copy takes both terms' gradients
    assert model.encoder[-1][-1].weight.grad.abs().sum() > 0
    model.term_losses(x, model.encode(x), "generator")
    assert len(passes) == 6  # the next phase draws afresh
    # outside a phase nothing is kept: two calls, two copies
    for _ in range(2):
        model.terms["consistency"].loss(model, x, model.encode(x))
    assert len(passes) == 10


def test_a_random_copy_serves_every_code_and_an_adversarial_one_only_its_own():
    torch.manual_seed(0)
    codes = {"y": LatentCode(CategoricalPrior(4)), "o": LatentCode(CategoricalPrior(6)), "z": LatentCode(GaussianPrior(2))}
    terms = {"y_consistency": Consistency(RandomAffine(), code="y"), "o_consistency": Consistency(RandomAffine(), code="o")}
    model = AdversarialAutoencoder(codes, terms=terms, discriminator_hidden=(8,))
    passes = []
    model.encoder.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0]))
    x = square_batch()
    model.term_losses(x, model.encode(x), "generator")
    assert len(passes) == 2  # the clean batch and one copy for both codes
    # a virtual adversarial direction is the one that changes its own code most: one draw per code
    for term in model.terms.values():
        term.perturbation = VirtualAdversarial(radius=1.0, neighbour=None)
    passes.clear()
    model.term_losses(x, model.encode(x), "generator")
    assert len(passes) == 1 + 2 * 3  # per code: the clean target, the probe, the copy


def test_instance_contrast_wants_each_copy_nearest_its_own_image():
    identity = RandomAffine(degrees=0, scale=(1, 1), max_shift=0)
    term = InstanceContrast(identity, code="y", temperature=0.5)
    x = square_batch(8)
    codes = {"y": torch.eye(8)[:, :6], "z": torch.eye(8)[:, 6:]}  # eight orthogonal unit vectors, joined

    def contrast(copies):
        return term.loss(SimpleNamespace(perturbed_codes=lambda perturbation, images, code: copies), x, codes)

    # each of the 16 rows: its partner at cosine 1, the 14 others at 0
    assert contrast(codes) == pytest.approx(math.log(1 + 14 * math.exp(-2)), abs=1e-5)
    swapped = {name: code[[1, 0, 3, 2, 5, 4, 7, 6]] for name, code in codes.items()}
    assert contrast(swapped) > contrast(codes) + 1.0  # each copy nearest another image
    with pytest.raises(ValueError, match="temperature must be > 0"):
        InstanceContrast(identity, temperature=0)

    # features: only the named codes count; copies whose y alone is swapped cost nothing more on z
    codes = {"y": torch.eye(8)[:, :4], "z": torch.randn(8, 3)}
    y_swapped = {"y": codes["y"][[1, 0, 3, 2, 5, 4, 7, 6]], "z": codes["z"]}
    assert contrast(y_swapped) > contrast(codes) + 0.1
    term.features = ["z"]
    assert contrast(y_swapped) == pytest.approx(contrast(codes).item(), abs=1e-6)
    with pytest.raises(ValueError, match=r"reads codes \['w'\], which are not inferred codes \['y', 'z'\]"):
        model_with(InstanceContrast(identity, features=["w"]))

    # it shares the consistency term's copy and trains the encoder through both sides
    torch.manual_seed(0)
    model = model_with(Consistency(RandomAffine()), InstanceContrast(RandomAffine()))
    passes = []
    model.encoder.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0]))
    losses = model.term_losses(x, model.encode(x), "generator")
    assert len(passes) == 2
    losses["instancecontrast"][1].backward()
    assert model.encoder[-1][-1].weight.grad.abs().sum() > 0


def test_the_pair_terms_compare_codes_in_fp32_under_bf16_autocast():
    """The codes are fp32; their products in the contrast and the paired joint must not round to bf16."""
    identity = RandomAffine(degrees=0, scale=(1, 1), max_shift=0)
    torch.manual_seed(0)
    x = square_batch(32)
    codes = {"y": torch.softmax(3 * torch.randn(32, 10), 1), "z": torch.randn(32, 5)}
    copies = {"y": torch.softmax(3 * torch.randn(32, 10), 1), "z": codes["z"] + 0.1 * torch.randn(32, 5)}
    model = SimpleNamespace(perturbed_codes=lambda perturbation, images, code: copies,
                            perturbed_code=lambda perturbation, images, code: copies[code])
    for term in (InstanceContrast(identity, code="y"), PairedMutualInformation(identity, code="y")):
        fp32 = term.loss(model, x, codes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = term.loss(model, x, codes)
        assert mixed.dtype == torch.float32 and torch.equal(mixed, fp32), type(term).__name__


def test_self_labelling_trains_the_copies_of_confident_images_towards_their_argmax():
    identity = RandomAffine(degrees=0, scale=(1, 1), max_shift=0)
    term = SelfLabelling(identity, code="y", threshold=0.9)
    x = square_batch(4)
    clean = torch.tensor([[0.95, 0.05, 0.0], [0.05, 0.95, 0.0], [0.5, 0.5, 0.0], [0.4, 0.3, 0.3]])

    def copy_loss(perturbed):
        return term.loss(SimpleNamespace(perturbed_code=lambda perturbation, images, code: perturbed), x, {"y": clean})

    agreeing = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 1.0]])
    assert copy_loss(agreeing).abs() < 1e-6  # the two unsure images add nothing, whatever their copies say
    swapped = agreeing[[1, 0, 2, 3]]
    # two of four copies put all their mass on the wrong category: -log(1e-8) each, over a batch of four
    assert copy_loss(swapped) == pytest.approx(2 * -math.log(1e-8) / 4, rel=1e-3)
    assert copy_loss(torch.full((4, 3), 1 / 3)) == pytest.approx(2 * math.log(3) / 4, rel=1e-4)
    with pytest.raises(ValueError, match="threshold must lie in"):
        SelfLabelling(identity, threshold=1.0)


def test_self_labelling_under_a_list_of_maps_adds_up_each_copys_cross_entropy():
    shift, turn = RandomShift(), RandomAffine(degrees=30)
    x = square_batch(2)
    clean = {"y": torch.tensor([[0.95, 0.05], [0.2, 0.8]])}  # image 0 confident at 0.9, image 1 not
    copies = {repr(shift): torch.tensor([[0.5, 0.5], [1.0, 0.0]]), repr(turn): torch.tensor([[0.25, 0.75], [0.5, 0.5]])}
    model = SimpleNamespace(perturbed_code=lambda perturbation, images, code: copies[repr(perturbation)])

    def loss(maps):
        return SelfLabelling(maps, code="y", threshold=0.9).loss(model, x, clean)

    # image 0's pseudo-label 0: its shifted copy costs -log 0.5, its turned one -log 0.25, over a batch of two
    assert loss(shift) == pytest.approx(math.log(2) / 2) and loss(turn) == pytest.approx(math.log(4) / 2)
    assert loss([shift, turn]) == pytest.approx(math.log(8) / 2)
    for maps in ([], [turn, RandomAffine(degrees=30)]):  # an equal map would only repeat the shared copy
        with pytest.raises(ValueError, match="needs distinct maps"):
            SelfLabelling(maps)


def test_self_labelling_can_take_its_targets_from_the_weight_average():
    torch.manual_seed(0)
    term = SelfLabelling(RandomAffine(degrees=0, scale=(1, 1), max_shift=0), targets="weight_average")
    model = model_with(term)
    output = model.encoder[-1][-1]

    def answer(category):  # an encoder whose y is category ``category`` for every image, with certainty
        with torch.no_grad():
            output.weight.zero_()
            output.bias.zero_()
            output.bias[category] = 50.0

    answer(0)
    averaging = with_weight_average(model)  # a copy of the weights: category 0
    answer(1)  # the weights have moved on
    x = square_batch(4)
    # the copies say 1; the average's pseudo-label 0 gives them -log(1e-8) each, the phase's own codes (1) nothing
    assert term.loss(model, x, model.encode(x)).item() == pytest.approx(-math.log(1e-8), rel=1e-3)
    assert averaging.averaged_module.training  # put back as it was
    assert SelfLabelling(term.perturbation, code="y").loss(model, x, model.encode(x)).abs() < 1e-6
    with pytest.raises(ValueError, match="targets must be 'codes' or 'weight_average'"):
        SelfLabelling(term.perturbation, targets="teacher")


def test_terms_reading_the_weight_average_share_one_pass_of_it_per_phase():
    torch.manual_seed(0)
    model = model_with(affine=SelfLabelling(RandomAffine(), targets="weight_average"),
                       elastic=SelfLabelling(RandomElastic(), targets="weight_average"))
    averaging = with_weight_average(model)
    passes = []
    averaging.averaged_module.encoder.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0]))
    x = square_batch()
    losses = model.term_losses(x, model.encode(x), "generator")
    assert len(losses) == 2 and len(passes) == 1  # two pseudo-labelled copies, one pass of the average
    model.term_losses(x, model.encode(x), "generator")
    assert len(passes) == 2  # the next phase reads the average afresh: it moves every step
    # outside a phase nothing is kept
    for term in model.terms.values():
        term.loss(model, x, model.encode(x))
    assert len(passes) == 4


def test_interpolation_consistency_is_zero_for_a_code_linear_in_the_image_and_positive_for_a_step():
    # images of one grey level g: a code [g, 1 - g] is linear in the image, so every mix's code is
    # the mix of the codes; a code that jumps at g = 0.5 misses the mixed target by 2 min(lam, 1 - lam)^2
    torch.manual_seed(0)
    x = torch.tensor([0.0, 1.0, 0.0, 1.0] * 8).view(-1, 1, 1, 1).expand(-1, 1, 28, 28)

    def model(code_of_grey):
        return SimpleNamespace(encode=lambda images: {"y": code_of_grey(images.mean((1, 2, 3)))})

    def linear(grey):
        return torch.stack([grey, 1 - grey], 1)

    def step(grey):
        return linear((grey > 0.5).float())

    term = InterpolationConsistency(code="y")
    assert term.loss(model(linear), x, {"y": linear(x.mean((1, 2, 3)))}) < 1e-10
    jumping = term.loss(model(step), x, {"y": step(x.mean((1, 2, 3)))})
    assert 0.01 < jumping <= 0.5  # about half the pairs mix a 0 with a 1: E[2 min(lam, 1 - lam)^2] = 1/6 each
    # alpha near 0 draws lam near 0 or 1: the mixes are the images themselves
    assert InterpolationConsistency(code="y", alpha=0.01).loss(model(step), x, {"y": step(x.mean((1, 2, 3)))}) < 0.05 * jumping
    with pytest.raises(ValueError, match="alpha must be > 0"):
        InterpolationConsistency(alpha=0)


def test_interpolation_consistency_trains_the_encoder_and_holds_its_targets_fixed():
    torch.manual_seed(0)
    term = InterpolationConsistency()
    model = model_with(term)
    x = torch.rand(32, 1, 28, 28)
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = term.loss(model, x, {"y": model.encode(x)["y"]})
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    targets = model.encode(x)["y"].detach().requires_grad_()
    term.loss(model, x, {"y": targets}).backward()
    assert targets.grad is None  # only the mixed images' codes learn
    assert InterpolationConsistency(targets="weight_average").needs_weight_average


def test_category_recovery_is_the_cross_entropy_of_the_drawn_categories():
    drawn = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    model = SimpleNamespace(sample_prior=lambda n: {"y": drawn, "z": torch.zeros(n, 2)},
                            decode=lambda codes: codes["y"].view(-1, 1, 1, 3), encode=lambda images: {"y": recovered(images)})
    term = CategoryRecovery(code="y")
    x = torch.zeros(2, 1, 1, 3)

    def recovered(images):  # reads the decoded category back from the image's pixels, with certainty
        return images.flatten(1) * (1 - 2e-8) + 1e-8

    assert term.loss(model, x, {}).abs() < 1e-6
    model.encode = lambda images: {"y": recovered(images)[:, [1, 2, 0]]}  # a wrong category each
    assert term.loss(model, x, {}).item() == pytest.approx(-math.log(2e-8), rel=1e-3)
    model.encode = lambda images: {"y": torch.full((2, 3), 1 / 3)}
    assert term.loss(model, x, {}).item() == pytest.approx(math.log(3), rel=1e-5)

    class Roll(Perturbation):  # moves each drawn category's pixel to the next category's place
        def __call__(self, x, predict=None):
            return x.roll(1, -1)

    model.encode = lambda images: {"y": recovered(images)}
    assert CategoryRecovery(code="y", perturbation=Roll()).loss(model, x, {}).item() == pytest.approx(-math.log(2e-8), rel=1e-3)


@pytest.mark.parametrize("train_decoder", [False, True])
def test_category_recovery_teaches_the_encoder_and_the_decoder_only_when_asked(train_decoder):
    torch.manual_seed(0)
    term = CategoryRecovery(train_decoder=train_decoder)
    model = model_with(term)
    # a decoder that paints each of the four categories as its own pattern, the style adding less
    model.decoder = torch.nn.Sequential(torch.nn.Linear(6, 784), torch.nn.Unflatten(1, (1, 28, 28)))
    with torch.no_grad():
        model.decoder[0].weight[:, :4] *= 5
    optimizer = torch.optim.Adam([*model.encoder.parameters(), *model.decoder.parameters()], lr=1e-3)
    x = square_batch(32)
    decoder_before = [p.detach().clone() for p in model.decoder.parameters()]
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = term.loss(model, x, {})
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    decoder_moved = any(not torch.equal(a, b) for a, b in zip(decoder_before, model.decoder.parameters()))
    assert decoder_moved == train_decoder
    assert term.phase == "reconstruction"


def test_a_term_joins_training_at_its_start_step():
    class RecordingBalance(Balance):
        def loss(self, model, x, codes):
            steps.append(model.global_step)
            return super().loss(model, x, codes)

    steps = []
    torch.manual_seed(0)
    model = model_with(RecordingBalance(code="y", start_step=9))
    x = square_batch(40) + 0.1 * torch.rand(40, 1, 28, 28)
    trainer = L.Trainer(max_steps=18, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, TensorBatches((x, torch.zeros(40, dtype=torch.long)), 10, shuffle=True))
    # three optimizer steps a batch: the term sits out batches 0-2 (steps 0-8) and joins the generator
    # phase of batches 3-5, which starts two steps into each batch
    assert steps == [11, 14, 17]
    with pytest.raises(ValueError, match="start_step must be >= 0"):
        Balance(start_step=-1)


def test_terms_are_keyed_by_name():
    codes = {"y": LatentCode(CategoricalPrior(4))}
    with pytest.raises(ValueError, match=r"terms are keyed by name, e.g. \{'consistency': Consistency\(...\)\}.*got list"):
        AdversarialAutoencoder(codes, terms=[Balance()], discriminator_hidden=(8,))
    with pytest.raises(ValueError, match="a term's name must be an identifier such as 'consistency', got 'two words'"):
        AdversarialAutoencoder(codes, terms={"two words": Balance()}, discriminator_hidden=(8,))
    # a setting of a name the config lacks builds the base class, whose loss is not written
    with pytest.raises(ValueError, match=r"term 'contrst' has no class of its own \(the other terms: balance\); a new term needs one, "
                                         r"e.g. --model.terms.contrst.class_path=aae_lightning.Consistency"):
        AdversarialAutoencoder(codes, terms={"balance": Balance(), "contrst": TrainingTerm(weight=2)}, discriminator_hidden=(8,))


def test_terms_need_a_categorical_code():
    with pytest.raises(ValueError, match="needs one of the inferred categorical codes"):
        AdversarialAutoencoder({"z": LatentCode(GaussianPrior(2))}, terms={"balance": Balance()}, discriminator_hidden=(8,))
    with pytest.raises(ValueError, match="weight must be >= 0"):
        Balance(weight=-1)


def test_random_shift_moves_whole_pixels_and_keeps_the_mass():
    torch.manual_seed(0)
    x = square_batch()
    shifted = RandomShift(3)(x)
    assert not torch.equal(shifted, x) and torch.allclose(shifted.sum((1, 2, 3)), x.sum((1, 2, 3)))
    assert set(shifted.unique().tolist()) <= {0.0, 1.0}


def test_random_affine_is_the_identity_at_zero_range_and_rotates_otherwise():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    x[:, :, :4], x[:, :, -4:], x[:, :, :, :4], x[:, :, :, -4:] = 0, 0, 0, 0
    assert torch.allclose(RandomAffine(degrees=0, scale=(1, 1), max_shift=0)(x), x, atol=1e-5)
    bar = torch.zeros(1, 1, 28, 28)
    bar[:, :, 4:24, 13:15] = 1.0  # a vertical bar
    turned = RandomAffine(degrees=90, scale=(1, 1), max_shift=0)(bar.repeat(200, 1, 1, 1))
    # mass is kept inside the frame, and some rotations lay the bar nearly flat
    assert torch.allclose(turned.sum((1, 2, 3)), bar.sum().expand(200), rtol=0.1)
    row_extent = (turned.sum(dim=3) > 0.5).sum(dim=(1, 2))
    assert row_extent.min() < 6 < 18 < row_extent.max()
    enlarged = RandomAffine(degrees=0, scale=(1.3, 1.3), max_shift=0)(bar)
    assert enlarged.sum() > 1.2 * bar.sum()


def test_random_affine_stroke_thickens_or_thins_each_line_by_the_share_drawn():
    line = torch.zeros(1, 1, 28, 28)
    line[:, :, 8:20, 14] = 1.0  # a vertical stroke one pixel wide
    no_affine = {"degrees": 0, "scale": (1, 1), "max_shift": 0}
    torch.manual_seed(0)
    copies = RandomAffine(stroke=1.0, **no_affine)(line.repeat(400, 1, 1, 1))[:, 0, 14]
    centre, left, right = copies[:, 14], copies[:, 13], copies[:, 15]
    # thickened by s: the stroke stays and its sides gain s; thinned by s: its 3x3 erosion is
    # empty, so the stroke fades to 1 - s and the sides stay empty
    # (the identity warp is bilinear: exact up to 1e-5)
    thicker = left > 1e-3
    assert torch.allclose(left, right, atol=1e-5) and torch.allclose(centre[thicker], torch.ones(1), atol=1e-5)
    assert (left[~thicker] < 1e-5).all() and (centre[~thicker] < 1).all()
    share = torch.where(thicker, left, centre - 1)
    assert share.min() < -0.9 and share.max() > 0.9 and share.mean().abs() < 0.1
    elastic = RandomElastic(alpha=0, stroke=1.0, **no_affine)(line.repeat(400, 1, 1, 1))[:, 0, 14]
    assert (elastic[:, 13] > 1e-3).any() and (elastic[:, 14] < 0.99).any()
    with pytest.raises(ValueError, match="0 <= stroke <= 1"):
        RandomAffine(stroke=1.5)


def test_random_elastic_displaces_pixels_smoothly_by_alpha():
    # on a ramp whose value is the column index, a bilinear warp returns where each pixel sampled
    # from, so the output minus the ramp is the horizontal displacement in pixels
    ramp = torch.arange(28.0).expand(1, 1, 28, 28).repeat(50, 1, 1, 1)
    inside = (slice(None), 0, slice(8, 20), slice(8, 20))
    no_affine = {"degrees": 0, "scale": (1, 1), "max_shift": 0}
    assert torch.allclose(RandomElastic(alpha=0, **no_affine)(ramp)[inside], ramp[inside], atol=1e-4)
    torch.manual_seed(0)
    field = (RandomElastic(alpha=34, sigma=5, **no_affine)(ramp) - ramp)[inside]
    torch.manual_seed(0)
    doubled = (RandomElastic(alpha=68, sigma=5, **no_affine)(ramp) - ramp)[inside]
    assert 0.5 < field.std() < 3 and torch.allclose(doubled, 2 * field, atol=1e-3)
    # smooth: next pixels move almost together; each image its own field
    assert (field[:, :, 1:] - field[:, :, :-1]).abs().mean() < 0.2 * field.abs().mean()
    assert (field[1:] - field[:-1]).abs().mean() > 0.5 * field.abs().mean()
    with pytest.raises(ValueError, match="sigma > 0"):
        RandomElastic(sigma=0)


@pytest.mark.parametrize("neighbour", [None, 3])
def test_virtual_adversarial_perturbation_has_the_radius_asked(neighbour):
    torch.manual_seed(0)
    model = model_with()
    x = torch.rand(12, 1, 28, 28)
    perturbation = VirtualAdversarial(radius=0.5, neighbour=neighbour)

    def predict(images):
        return model.encode(images)["y"]

    moved = perturbation(x, predict)
    norms = (moved - x).flatten(1).norm(dim=1)
    if neighbour is None:
        expected = torch.full((12,), 0.5)
    else:
        distances = torch.cdist(x.flatten(1), x.flatten(1))
        expected = 0.5 * torch.stack([row[row > 0].sort().values[neighbour - 1] for row in distances])
    assert torch.allclose(norms, expected, rtol=1e-4)
    # the adversarial direction changes the prediction more than a random one of the same length
    random = x + (moved - x).flatten(1).norm(dim=1).view(-1, 1, 1, 1) * torch.nn.functional.normalize(torch.randn_like(x).flatten(1)).view_as(x)
    with torch.no_grad():
        clean = predict(x)

        def divergence(images):
            return torch.nn.functional.kl_div(torch.log(predict(images)), clean, reduction="batchmean")

        assert divergence(moved) > divergence(random)


def test_neighbour_agreement_pulls_each_image_towards_its_nearest_other_images_codes():
    torch.manual_seed(0)
    squares, bars = square_batch(4), torch.zeros(4, 1, 28, 28)
    bars[:, :, :, 12:16] = 1.0
    x = torch.cat([squares, bars]) + 0.05 * torch.rand(8, 1, 28, 28)
    term = NeighbourAgreement(neighbours=2, memory_size=8)
    model = model_with(term, k=8).eval()  # batch norm's running statistics: an image's hidden layer is its own
    hidden, codes = model.encode_with_features(x)
    assert hidden.shape == (8, 1000) and torch.equal(codes["y"], model.encode(x)["y"])
    assert term.loss(model, x, codes) == 0  # the memory fills first
    features, _, prints = term._memory

    def loss(memory_codes, q, neighbours=2):
        term._memory, term.neighbours = (features, memory_codes, prints), neighbours
        return term.loss(model, x, {"y": q, "z": codes["z"]})

    kinds = torch.eye(8)[[0, 0, 0, 0, 1, 1, 1, 1]]  # squares in category 0, bars in 1
    assert loss(kinds, kinds).abs() < 1e-6  # each image's two nearest are of its own kind
    assert loss(kinds, kinds[[4, 5, 6, 7, 0, 1, 2, 3]]) == pytest.approx(-math.log(1e-8), rel=1e-3)
    # an image's own entry is never its neighbour: with a category per image, agreeing with its own fails
    assert loss(torch.eye(8), torch.eye(8), neighbours=1) == pytest.approx(-math.log(1e-8), rel=1e-3)
    assert pickle.loads(pickle.dumps(term))._memory is None  # checkpoints leave the memory out
    with pytest.raises(ValueError, match="need 1 <= neighbours < memory_size"):
        NeighbourAgreement(neighbours=4, memory_size=4)
