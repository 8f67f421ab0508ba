import pytest
import torch
import yaml

from aae_lightning import Deskew, LoopFill, MNISTDataModule, PenWidth
from aae_lightning.cli import cli_main
from conftest import CONFIGS


def slanted_bars(slants, size=28):
    """One bar per slant: the column of its ink moves by ``slant`` pixels per row."""
    images = torch.zeros(len(slants), 1, size, size)
    for i, a in enumerate(slants):
        for row in range(6, 22):
            images[i, 0, row, round(14 + a * (row - 14))] = 1.0
    return images


def test_deskew_stands_slanted_strokes_upright_about_their_centre():
    bars = slanted_bars([-0.5, -0.2, 0.0, 0.3, 0.6])
    before, rows_before = Deskew.slant(bars)
    assert torch.allclose(before, torch.tensor([-0.5, -0.2, 0.0, 0.3, 0.6]), atol=0.03)
    upright = Deskew()(bars)
    after, rows_after = Deskew.slant(upright)
    assert after.abs().max() < 0.01
    # each bar now stands in the column of its centre of mass, which the shear about it keeps
    columns = upright[:, 0].sum(1)
    assert (columns.argmax(1) - 14).abs().max() <= 1 and (columns.max(1).values > 0.6 * upright.sum((1, 2, 3))).all()
    assert torch.allclose(rows_after, rows_before, atol=1e-4)
    assert torch.allclose(upright.sum((1, 2, 3)), bars.sum((1, 2, 3)), rtol=1e-4)
    # an upright stroke is left as it is, and chunks change nothing
    assert torch.allclose(upright[2], bars[2], atol=1e-6)
    assert torch.allclose(Deskew(batch_size=2)(bars), upright, atol=1e-6)


def test_deskew_rejects_an_empty_chunk_size():
    with pytest.raises(ValueError, match="Deskew: batch_size must be >= 1, got 0"):
        Deskew(batch_size=0)


def test_pen_width_thickens_thin_strokes_and_thins_bold_ones():
    # upright bars 16 rows long, 1, 3 and 5 pixels wide, and a blank image
    images = torch.zeros(4, 1, 28, 28)
    for i, width in enumerate((1, 3, 5)):
        images[i, 0, 6:22, 14 - width // 2: 15 + width // 2] = 1.0
    widths = PenWidth.measure(images)
    # ink over half the outline: about 16 w / (16 + w), short of w by the bar's two ends
    assert torch.allclose(widths[:3], torch.tensor([16 / 17, 48 / 19, 80 / 21]), atol=0.06) and widths[3] == 0
    rewidthed = PenWidth(width=2.5)(images)
    assert torch.allclose(PenWidth.measure(rewidthed[:3]), torch.tensor(2.5), atol=0.03)
    # the thin bar keeps its line and gains grey sides; the bold one loses ink from its sides; the
    # 3-pixel bar, about 2.5 wide already, hardly changes; nothing is drawn on the blank image
    assert torch.equal(rewidthed[0, 0, 6:22, 14], images[0, 0, 6:22, 14]) and rewidthed[0].sum() > 2 * images[0].sum()
    assert rewidthed[2].sum() < 0.8 * images[2].sum() and torch.equal(rewidthed[2, 0, 8:20, 13:16], images[2, 0, 8:20, 13:16])
    assert (rewidthed[1] - images[1]).abs().sum() < 0.05 * images[1].sum()
    assert not rewidthed[3].any() and rewidthed.min() >= 0 and rewidthed.max() <= 1
    assert torch.allclose(PenWidth(width=2.5, batch_size=3)(images), rewidthed)


def test_pen_width_rejects_a_width_that_is_not_positive():
    with pytest.raises(ValueError, match="PenWidth: width must be > 0 pixels, got 0"):
        PenWidth(width=0)


def draw_ring(image, top, left, bottom, right, ink=1.0):
    """A one-pixel square outline with corners (top, left) and (bottom, right), both included."""
    image[0, top:bottom + 1, left] = image[0, top:bottom + 1, right] = ink
    image[0, top, left:right + 1] = image[0, bottom, left:right + 1] = ink


def test_loop_fill_paints_what_the_ink_encloses_and_nothing_else():
    images = torch.zeros(5, 1, 28, 28)
    # 0: a closed square ring; 1: the ring with a one-pixel gap in its top (a 4 or 9 left open);
    # 2: two rings one above the other (an 8); 3: a ring whose corner is closed only diagonally;
    # 4: a ring of ink at 0.2, under the threshold, which is background
    for i in (0, 1, 3):
        draw_ring(images[i], 8, 8, 19, 19)
    images[1, 0, 8, 13] = 0.0
    images[3, 0, 8, 8] = 0.0
    for top in (4, 14):
        draw_ring(images[2], top, 10, top + 9, 17)
    draw_ring(images[4], 8, 8, 19, 19, ink=0.2)
    filled = LoopFill(value=0.3, threshold=0.3)(images)
    painted = filled != images
    assert torch.equal(painted[0, 0, 9:19, 9:19], torch.ones(10, 10, dtype=torch.bool)) and painted[0].sum() == 100
    assert torch.all(filled[0, 0, 9:19, 9:19] == 0.3)
    assert not painted[1].any() and not painted[4].any()
    # the 8's two rings touch (rows 13 and 14): two loops, 8 x 6 pixels each
    assert painted[2].sum() == 2 * 8 * 6
    # ink touching only at a corner closes the loop (background joins up, down, left and right)
    assert painted[3, 0, 9:19, 9:19].all() and painted[3].sum() == 100 and not painted[3, 0, 8, 8]
    # the ink itself is untouched, and chunks change nothing
    assert torch.equal(filled[images >= 0.3], images[images >= 0.3])
    assert torch.equal(LoopFill(batch_size=2)(images), filled)


def test_loop_fill_rejects_values_outside_the_unit_range():
    with pytest.raises(ValueError, match=r"LoopFill: value and threshold must lie in \(0, 1\], got value=0 and threshold=0.3"):
        LoopFill(value=0)


def test_a_datamodule_transform_reaches_every_split(mnist_dir):
    plain = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=100)
    deskewed = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=100, transform=Deskew())
    # a list applies its transforms in order
    chained = MNISTDataModule(data_dir=str(mnist_dir), download=False, val_size=100, transform=[Deskew(), PenWidth()])
    for dm in (plain, deskewed, chained):
        dm.setup("fit")
        dm.setup("test")
    for split in ("train", "val", "test"):
        assert torch.equal(deskewed.splits[split][0], Deskew()(plain.splits[split][0]))
        assert torch.equal(chained.splits[split][0], PenWidth()(Deskew()(plain.splits[split][0])))
        assert torch.equal(deskewed.splits[split][1], plain.splits[split][1])


def test_the_transform_is_one_config_entry(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "clustering_10.yaml"), "--data.transform=aae_lightning.Deskew", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["init_args"]["transform"] == {"class_path": "aae_lightning.Deskew", "init_args": {"batch_size": 4096}}
