"""Dimensionality reduction with cluster heads (paper sec. 7): the decoder sees W y + z."""

import pytest
import torch
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from aae_lightning import AdversarialAutoencoder, CategoricalPrior, GaussianPrior, HeadSeparation, LatentCode
from aae_lightning.cli import cli_main
from aae_lightning.figures import encode_split, map_coordinates
from conftest import BLOBS_NOT_STROKES, CONFIGS

DIM_CONFIGS = sorted(CONFIGS.glob("dim_reduction*.yaml"))


def model(k: int = 3, n: int = 2, terms=None, **head) -> AdversarialAutoencoder:
    codes = {"y": LatentCode(CategoricalPrior(k), added_to="z", **head), "z": LatentCode(GaussianPrior(n))}
    return AdversarialAutoencoder(codes, terms=terms)


def test_head_cost_is_zero_for_far_heads_and_positive_for_close_ones():
    term = HeadSeparation(threshold=2.0)
    m = model(terms={"head_separation": term})
    with torch.no_grad():
        m.heads["y"].copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]))
    assert term.loss(m, None, None).item() == 0
    with torch.no_grad():
        m.heads["y"].copy_(torch.tensor([[0.0, 0.0], [1.5, 0.0], [0.0, 5.0]]))
    assert term.loss(m, None, None).item() == pytest.approx(0.5)  # one pair, 0.5 closer than 2
    term.loss(m, None, None).backward()
    assert m.heads["y"].grad[0, 0] > 0 > m.heads["y"].grad[1, 0]  # the gradient pushes the pair apart


def test_decoder_sees_heads_times_y_plus_z():
    m = model()
    heads = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    with torch.no_grad():
        m.heads["y"].copy_(heads)
    codes = {"y": torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5]]), "z": torch.tensor([[0.1, 0.2], [0.3, 0.4]])}
    expected = torch.tensor([[1.1, 2.2], [4.3, 5.4]])
    assert torch.allclose(m.decoder_input(codes), expected)
    assert m.decoder.net[0].in_features == 2  # the map, not y beside z
    assert m.decode(codes).shape == (2, 1, 28, 28)
    # the heads learn with the autoencoder
    assert any(p is m.heads["y"] for group in m.configure_optimizers()[0].param_groups for p in group["params"])


def test_fixed_heads_are_scale_times_identity_and_not_trained():
    m = model(k=4, n=4, head_scale=10, learned_heads=False)
    assert torch.equal(m.head_matrix("y"), 10 * torch.eye(4)) and len(m.heads) == 0
    points, heads = map_coordinates(m, {"code/y": torch.eye(4), "code/z": torch.zeros(4, 4)})
    # shown in 2-D with the heads evenly on the unit circle
    assert torch.allclose(heads.norm(dim=1), torch.ones(4), atol=1e-5) and torch.allclose(points, heads, atol=1e-5)


def test_fixed_heads_need_codes_of_one_size():
    with pytest.raises(ValueError, match="same size"):
        model(k=3, n=2, head_scale=10, learned_heads=False)


def test_head_cost_needs_heads():
    with pytest.raises(ValueError, match="needs cluster heads"):
        AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(3)), "z": LatentCode(GaussianPrior(2))}, terms={"head_separation": HeadSeparation(1.0)})


def test_added_to_must_name_another_code():
    with pytest.raises(ValueError, match="added_to='w'"):
        AdversarialAutoencoder({"y": LatentCode(CategoricalPrior(3), added_to="w"), "z": LatentCode(GaussianPrior(2))})


@pytest.mark.parametrize("config", DIM_CONFIGS, ids=[c.stem for c in DIM_CONFIGS])
def test_dim_reduction_configs_print(config, capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--print_config"])
    assert "added_to: z" in capsys.readouterr().out


def test_short_fit_separates_classes_in_the_2d_map(mnist_dir, offline_wandb):
    cli = cli_main(["--config", str(CONFIGS / "dim_reduction_2d.yaml"), f"--data.data_dir={mnist_dir}", "--data.download=false",
                    *BLOBS_NOT_STROKES,
                    "--data.val_size=100", "--trainer.max_epochs=8", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
                    "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false", "--model.init_args.figures_every_n_epochs=0"], run=False)
    head_cost = cli.model.terms["head_separation"]
    before = head_cost.loss(cli.model, None, None).item()
    cli.trainer.fit(cli.model, cli.datamodule)
    images, labels = cli.datamodule.splits["val"]
    outputs = encode_split(cli.model, images, labels)
    points, heads = map_coordinates(cli.model, outputs)
    accuracy = cross_val_score(KNeighborsClassifier(5), points.numpy(), labels.numpy(), cv=5).mean()
    assert accuracy > 0.6, accuracy  # chance: 0.1
    assert head_cost.loss(cli.model, None, None).item() < 0.8 * before  # the heads move apart
