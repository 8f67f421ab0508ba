"""The figures of a model, as PIL images by name: drawn by the callbacks during training and by the
``figures`` verb from a checkpoint, and written as PNG files either way.

``outputs`` is what the evaluation steps return, gathered: ``labels``, ``code/<name>`` per code
and, for the cluster grid, the images ``x``.
"""

import io
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def figure_to_image(fig) -> Image.Image:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def grid_image(images: torch.Tensor, nrow: int) -> Image.Image:
    # as a PIL image: wandb 0.31 casts float tensors to uint8 without scaling [0, 1] up
    return to_pil_image(make_grid(images, nrow=nrow, padding=2, pad_value=0.5))


def save_images(images: dict[str, Image.Image], folder: Path, suffix: str = "") -> list[Path]:
    """Each image as ``folder/<name with / as _><suffix>.png``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images.items():
        path = folder / f"{name.replace('/', '_')}{suffix}.png"
        image.save(path)
        paths.append(path)
    return paths


def latent_scatter(model, outputs: dict[str, torch.Tensor], code: str | None = None) -> dict[str, Image.Image]:
    """A continuous code coloured by the true label (its first two principal components when it
    has more than two dimensions); default the first non-categorical code."""
    name = code or next((c.name for c in model.codes if not c.prior.num_classes), None)
    if name is None:
        return {}
    z = outputs[f"code/{name}"]
    projected = z.shape[1] > 2
    if projected:
        z = z - z.mean(0)
        _, _, v = torch.pca_lowrank(z, q=2, center=False)
        z = z @ v
    fig, ax = plt.subplots(figsize=(6, 6))
    labels = outputs["labels"]
    points = ax.scatter(z[:, 0], z[:, 1], c=labels.clamp(min=0), cmap="tab10", s=3, alpha=0.7)
    if bool((labels >= 0).any()):
        ax.legend(*points.legend_elements(), title="label", loc="upper right", fontsize="small")
    ax.set_title(f"code {name}" + (" (first two principal components)" if projected else ""))
    return {f"latent/{name}": figure_to_image(fig)}


def cluster_sizes(model, outputs: dict[str, torch.Tensor]) -> dict[str, Image.Image]:
    """How many examples the encoder assigns to each cluster."""
    if model.cluster_code is None:
        return {}
    probs = outputs[f"code/{model.cluster_code}"]
    sizes = torch.bincount(probs.argmax(1), minlength=probs.shape[1])
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(np.arange(len(sizes)), sizes.numpy())
    ax.set_xlabel("cluster")
    ax.set_ylabel("examples")
    return {"latent/cluster_sizes": figure_to_image(fig)}


def head_code(model):
    """The code whose heads make the model's map (``added_to`` another code), or None."""
    return next((c for c in model.codes if c.added_to is not None), None)


@torch.no_grad()
def map_coordinates(model, outputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's map W y + z of each example of ``outputs`` and the heads (rows of W), in 2-D:
    as they are for a 2-D map; for more dimensions through the linear map (least squares through
    the heads) that puts the heads evenly on a circle, as the paper shows its 10-D map."""
    c = head_code(model)
    heads = model.head_matrix(c.name).detach().float().cpu()
    codes = {k.removeprefix("code/"): v.to(model.device) for k, v in outputs.items() if k.startswith("code/")}
    points = model.decoder_parts(codes)[c.added_to].float().cpu()
    if heads.shape[1] == 2:
        return points, heads
    angle = torch.arange(len(heads)) * (2 * torch.pi / len(heads))
    circle = torch.stack([angle.cos(), angle.sin()], dim=1)
    projection = torch.linalg.pinv(heads) @ circle
    return points @ projection, heads @ projection


def representation_map(model, outputs: dict[str, torch.Tensor]) -> dict[str, Image.Image]:
    """The paper's Figures 10-11: the map coloured by the true label, the cluster heads marked."""
    c = head_code(model)
    if c is None:
        return {}
    points, heads = map_coordinates(model, outputs)
    fig, ax = plt.subplots(figsize=(7, 7))
    labels = outputs["labels"]
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.clamp(min=0), cmap="tab10", s=3, alpha=0.6)
    if bool((labels >= 0).any()):
        ax.legend(*scatter.legend_elements(), title="label", loc="upper right", fontsize="small")
    ax.scatter(heads[:, 0], heads[:, 1], marker="x", c="black", s=60, label="heads")
    for k, (hx, hy) in enumerate(heads.tolist()):
        ax.annotate(str(k), (hx, hy), fontsize=8)
    dim = model.head_matrix(c.name).shape[1]
    ax.set_title(f"{dim}-D map W {c.name} + {c.added_to}" + (" (heads placed on a circle)" if dim > 2 else ""))
    return {"map/representation": figure_to_image(fig)}


@torch.no_grad()
def cluster_heads(model) -> torch.Tensor:
    """The decoder at each one-hot cluster code with every other code at zero."""
    k = model.code_dim(model.cluster_code)
    codes = {c.name: torch.zeros(k, c.dim, device=model.device) for c in model.codes}
    codes[model.cluster_code] = torch.eye(k, device=model.device)
    return model.decode(codes).cpu().clamp(0, 1)


def cluster_grid(model, outputs: dict[str, torch.Tensor], images_per_cluster: int = 10) -> dict[str, Image.Image]:
    """The paper's Figure 9: one row per cluster, its head followed by the images the encoder
    assigns to the cluster with the highest confidence."""
    if model.cluster_code is None:
        return {}
    probs, x = outputs[f"code/{model.cluster_code}"], outputs["x"]
    heads = cluster_heads(model)
    assigned, confidence = probs.argmax(1), probs.max(1).values
    blank = torch.zeros_like(x[0])
    rows = []
    for cluster in range(probs.shape[1]):
        members = (assigned == cluster).nonzero().squeeze(1)
        best = members[confidence[members].argsort(descending=True)[:images_per_cluster]]
        rows.extend([heads[cluster], *x[best]] + [blank] * (images_per_cluster - len(best)))
    return {"clusters/grid": grid_image(torch.stack(rows), nrow=images_per_cluster + 1)}


@torch.no_grad()
def prior_samples(model, num_samples: int = 100) -> dict[str, Image.Image]:
    """Images decoded from codes drawn from every prior."""
    samples = model.decode(model.sample_prior(num_samples)).cpu().clamp(0, 1)
    return {"samples/prior": grid_image(samples, int(np.ceil(np.sqrt(num_samples))))}


@torch.no_grad()
def style_content_grid(model, content_code: str | None = None, num_styles: int = 10) -> dict[str, Image.Image]:
    """The paper's Figures 6-8, style against content: each row decodes one draw of the other
    codes from their priors (a style), each column one category of the categorical content code
    (default the cluster code, else the first categorical one): for a clustering model, samples
    per cluster; for a classifier, per class."""
    name = content_code or model.cluster_code or next((c.name for c in model.codes if c.prior.num_classes), None)
    if name is None:
        return {}
    k = model.code_dim(name)
    codes = {n: v.repeat_interleave(k, dim=0) for n, v in model.sample_prior(num_styles).items()}
    codes[name] = torch.eye(k, device=model.device).repeat(num_styles, 1)
    return {"samples/style_content": grid_image(model.decode(codes).cpu().clamp(0, 1), nrow=k)}


@torch.no_grad()
def encode_split(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> dict[str, torch.Tensor]:
    """``outputs`` for a whole split: its images, labels and every code, in eval mode."""
    model.eval()
    known = bool((labels >= 0).all())
    chunks = [model.encode(x.to(model.device), y.to(model.device) if known else None)
              for x, y in zip(images.split(batch_size), labels.split(batch_size))]
    return {"x": images, "labels": labels, **{f"code/{k}": torch.cat([c[k] for c in chunks]).float().cpu() for k in chunks[0]}}


def all_figures(model, outputs: dict[str, torch.Tensor], images_per_cluster: int = 10, num_styles: int = 10) -> dict[str, Image.Image]:
    """Every figure the training callbacks draw, and the generated samples per category."""
    return {
        **latent_scatter(model, outputs),
        **cluster_sizes(model, outputs),
        **cluster_grid(model, outputs, images_per_cluster),
        **representation_map(model, outputs),
        **prior_samples(model),
        **style_content_grid(model, num_styles=num_styles),
    }


def main(argv: list[str]) -> None:
    """``python -m aae_lightning figures --config C --ckpt_path CKPT [--split test] [--output DIR] [CLI args]``:
    the figures of a trained model on a DataModule's validation or test split, as PNG files,
    without training. Other arguments (``--data.data_dir=...``) go to the CLI as in ``fit``."""
    import argparse

    from aae_lightning.checkpointing import CHECKPOINT_NAMES, check_ckpt_path, check_matches, load_checkpoint, named_checkpoint
    from aae_lightning.cli import cli_main, one_line_errors
    from aae_lightning.runs import checkpoint_run_directory

    parser = argparse.ArgumentParser(prog="python -m aae_lightning figures", description=main.__doc__)
    parser.add_argument("--ckpt_path", required=True, help="the trained model: a file, or `best` / `last` of the newest earlier run")
    parser.add_argument("--split", choices=("val", "test"), default="test")
    parser.add_argument("--output", help="default: figures/<split> in the checkpoint's run folder")
    parser.add_argument("--images_per_cluster", type=int, default=10)
    parser.add_argument("--num_styles", type=int, default=10, help="rows of the samples per cluster / class")
    parser.add_argument("--seed", type=int, default=0, help="of the prior samples")
    opts, cli_args = parser.parse_known_args(argv)
    cli = cli_main(cli_args, run=False)
    with one_line_errors():
        check_ckpt_path(opts.ckpt_path, "figures")
        ckpt_path = named_checkpoint(cli.trainer, opts.ckpt_path, "figures") if opts.ckpt_path in CHECKPOINT_NAMES else opts.ckpt_path
        checkpoint = load_checkpoint(ckpt_path)
        check_matches(checkpoint, cli.model, ckpt_path)
        cli.model.load_state_dict(checkpoint["state_dict"])
        cli.datamodule.setup("validate" if opts.split == "val" else "test")
        images, labels = cli.datamodule.splits[opts.split][:2]
    torch.manual_seed(opts.seed)
    outputs = encode_split(cli.model, images, labels)
    folder = Path(opts.output) if opts.output else checkpoint_run_directory(ckpt_path) / "figures" / opts.split
    paths = save_images(all_figures(cli.model, outputs, opts.images_per_cluster, opts.num_styles), folder)
    print(f"figures: wrote {len(paths)} PNG files to {folder}: {', '.join(p.name for p in paths)}", flush=True)
