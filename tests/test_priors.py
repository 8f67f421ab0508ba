import math

import pytest
import torch

from aae_lightning import CategoricalPrior, GaussianMixturePrior, GaussianPrior, SwissRollPrior


def test_gaussian_prior_moments():
    torch.manual_seed(0)
    x = GaussianPrior(dim=5, std=2.0).sample(20000)
    assert x.shape == (20000, 5)
    assert x.mean(0).abs().max() < 0.1
    assert (x.std(0) - 2.0).abs().max() < 0.1


def test_mixture_components_sit_on_the_circle_at_their_angles():
    prior = GaussianMixturePrior(num_components=10, radius=4.0)
    labels = torch.full((2000,), 3)
    x = prior.sample(2000, labels=labels)
    centre = x.mean(0)
    expected = 4.0 * torch.tensor([math.cos(3 * 2 * math.pi / 10), math.sin(3 * 2 * math.pi / 10)])
    assert torch.allclose(centre, expected, atol=0.1)
    unlabeled = prior.sample(5000)
    assert (unlabeled.norm(dim=1).mean() - 4.0).abs() < 0.1


def test_swiss_roll_sections_are_ordered_along_the_roll():
    prior = SwissRollPrior(num_sections=10, noise=0.0)
    radii = [prior.sample(500, labels=torch.full((500,), k)).norm(dim=1).mean() for k in range(10)]
    assert all(a < b for a, b in zip(radii, radii[1:]))


def test_categorical_prior_is_uniform_one_hot():
    torch.manual_seed(0)
    prior = CategoricalPrior(num_classes=16)
    x = prior.sample(16000)
    assert torch.equal(x.sum(1), torch.ones(16000))
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert (x.mean(0) - 1 / 16).abs().max() < 0.01
    assert torch.allclose(prior.activate(torch.randn(4, 16)).sum(1), torch.ones(4))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: GaussianPrior(dim=0), "dim must be >= 1"),
        (lambda: GaussianPrior(dim=2, std=0), "std must be > 0"),
        (lambda: CategoricalPrior(num_classes=1), "num_classes must be >= 2"),
        (lambda: GaussianMixturePrior(num_components=0), "num_components must be >= 1"),
    ],
)
def test_invalid_prior_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()
