"""Training throughput of the clustering networks, three ways, alternating in one process:

  ours      the real fit path: AdversarialAutoencoder + FashionMNIST/MNIST DataModule + Trainer,
            W&B logging on (offline)
  loop-dl   a plain PyTorch loop of the same nets, losses and three optimizers, fed by a
            torchvision DataLoader with per-sample ToTensor transforms, as public AAE code does
  loop-mem  the same loop fed by in-memory tensors

and in each precision of ``--precisions``: ``32`` and ``bf16-mixed`` (ours: the Trainer's
``precision``; the loops: the step under ``torch.autocast(dtype=torch.bfloat16, cache_enabled=False)``,
as Lightning runs it; the DataLoader loop only in fp32, where it measures the data path). It prints
samples/s, the ratios, and the achieved GFLOP/s (from the nets' FLOPs) against the rate
``torch.mm`` reaches at the same matrix sizes on this machine.

``--device cuda`` runs all three on the GPU: ours with the data resident there (the DataModule's
``on_device``), the in-memory loop likewise, the DataLoader loop copying each batch from pinned memory.

    python benchmarks/throughput.py --data-dir /usr/share/datasets/fashion-mnist --batch-size 100
    python benchmarks/throughput.py --device cuda --batch-size 100 1000
"""

import argparse
import gzip
import os
import shutil
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
import wandb

from aae_lightning.cli import cli_main
from aae_lightning.nets import Discriminator, MLPDecoder, MLPEncoder

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "clustering.yaml"
# one GPU with the splits in its memory, as a user runs it
GPU_PRESET = CONFIG.parent / "trainer" / "gpu.yaml"
HIDDEN = (1000, 1000)
K, STYLE = 16, 5


def linear_macs(module: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def flops_per_sample(enc: int, dec: int, disc: int) -> int:
    """Multiply-adds x 2. Forward costs 2 x MACs, backward 4 x MACs (input and weight gradients).
    reconstruction: encoder and decoder forward + backward; regularization: one encoder forward,
    the discriminators forward + backward on real and fake, then on fake again with the
    backward running on through the encoder."""
    return 6 * (enc + dec) + 2 * enc + 12 * disc + 6 * disc + 4 * enc


class PlainAAE:
    """The module's training step without Lightning: same nets, losses and optimizers."""

    def __init__(self, lr=2e-4, betas=(0.5, 0.999), precision: str = "32", device: str = "cpu"):
        self.device = torch.device(device)
        self.encoder = MLPEncoder((1, 28, 28), K + STYLE, HIDDEN).to(device)
        self.decoder = MLPDecoder(K + STYLE, (1, 28, 28), HIDDEN).to(device)
        self.d_y, self.d_z = Discriminator(K, HIDDEN).to(device), Discriminator(STYLE, HIDDEN).to(device)
        enc = list(self.encoder.parameters())
        # fused under bf16, as the module's: the ratio measures what Lightning and our module add
        fused = precision == "bf16-mixed"
        self.opt_ae = torch.optim.Adam(enc + list(self.decoder.parameters()), lr=lr, betas=betas, fused=fused)
        self.opt_d = torch.optim.Adam([*self.d_y.parameters(), *self.d_z.parameters()], lr=lr, betas=betas, fused=fused)
        self.opt_g = torch.optim.Adam(enc, lr=lr, betas=betas, fused=fused)

    def encode(self, x):
        y, z = self.encoder(x).split([K, STYLE], dim=1)
        return torch.softmax(y, 1), z

    def step(self, x):
        y, z = self.encode(x)
        recon = F.binary_cross_entropy_with_logits(self.decoder(torch.cat([y, z], 1)), x)
        self.opt_ae.zero_grad(set_to_none=True)
        recon.backward()
        self.opt_ae.step()

        y, z = self.encode(x)
        n = len(x)
        real_y = F.one_hot(torch.randint(K, (n,), device=self.device), K).float()
        real_z = torch.randn(n, STYLE, device=self.device)
        d_loss = 0
        for disc, real, fake in ((self.d_y, real_y, y.detach()), (self.d_z, real_z, z.detach())):
            r, f = disc(real), disc(fake)
            d_loss = d_loss + F.binary_cross_entropy_with_logits(r, torch.ones_like(r)) + F.binary_cross_entropy_with_logits(f, torch.zeros_like(f))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()

        g_loss = 0
        for disc, fake in ((self.d_y, y), (self.d_z, z)):
            f = disc(fake)
            g_loss = g_loss + F.binary_cross_entropy_with_logits(f, torch.ones_like(f))
        self.opt_g.zero_grad(set_to_none=True)
        for p in [*self.d_y.parameters(), *self.d_z.parameters()]:
            p.requires_grad_(False)
        g_loss.backward()
        for p in [*self.d_y.parameters(), *self.d_z.parameters()]:
            p.requires_grad_(True)
        self.opt_g.step()


def synchronize(device: str) -> None:
    """Wait for the GPU's queued work, so that a clock read counts it."""
    if device == "cuda":
        torch.cuda.synchronize()


def time_loop(batches, steps: int, warmup: int, precision: str = "32", device: str = "cpu") -> float:
    model = PlainAAE(precision=precision, device=device)
    start = None
    for i, (x, _) in enumerate(batches):
        if i == warmup:
            synchronize(device)
            start = time.perf_counter()
        if i == warmup + steps:
            break
        # no cast cache: the optimizers change the weights between the step's phases, and a cache
        # would hand the later phases bf16 copies of the weights from before (Lightning turns it off too)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed", cache_enabled=False):
            model.step(x.to(device, non_blocking=True))
    synchronize(device)
    return steps / (time.perf_counter() - start)


def dataloader_batches(root: Path, batch_size: int, device: str):
    dataset = torchvision.datasets.FashionMNIST(root, train=True, transform=torchvision.transforms.ToTensor(), download=False)
    while True:
        yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, pin_memory=device == "cuda")


def memory_batches(images: torch.Tensor, batch_size: int):
    while True:
        order = torch.randperm(len(images), device=images.device)
        for i in range(len(images) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield images[idx], None


class StepTimer(L.Callback):
    def __init__(self, warmup: int, device: str):
        self.warmup, self.device, self.start, self.batches = warmup, device, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batches == self.warmup:
            synchronize(self.device)
            self.start = time.perf_counter()
        self.batches += 1

    def on_train_end(self, trainer, pl_module):
        synchronize(self.device)
        self.rate = (self.batches - self.warmup) / (time.perf_counter() - self.start)


def time_ours(data_dir: str, batch_size: int, steps: int, warmup: int, precision: str = "32", val_size: int = 5000,
              device: str = "cpu") -> float:
    timer = StepTimer(warmup, device)
    on_gpu = ["--config", str(GPU_PRESET)] if device == "cuda" else []
    cli = cli_main(["--config", str(CONFIG), "--data=aae_lightning.FashionMNISTDataModule",
                    f"--data.data_dir={data_dir}", "--data.download=false", f"--data.batch_size={batch_size}", f"--data.val_size={val_size}",
                    f"--model.codes.y.prior.num_classes={K}", f"--model.codes.z.prior.dim={STYLE}", "--model.init_args.discriminator_noise=0",
                    "--model.init_args.input_noise=0", "--model.init_args.terms={}",
                    "--model.init_args.encoder=aae_lightning.nets.MLPEncoder",
                    f"--trainer.max_steps={3 * (steps + warmup)}", "--trainer.limit_val_batches=0",
                    "--trainer.num_sanity_val_steps=0", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
                    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                    f"--trainer.precision={precision}", *on_gpu], run=False)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, cli.datamodule)
    wandb.finish()
    return timer.rate


def gemm_gflops(batch_size: int, device: str, repeats: int = 20) -> float:
    """torch.mm at the forward sizes of the nets (backward GEMMs have the same shapes transposed)."""
    sizes = [(784, 1000), (1000, 1000), (1000, K + STYLE), (K + STYLE, 1000), (1000, 784), (K, 1000), (STYLE, 1000), (1000, 1)]
    flops = seconds = 0.0
    for i, o in sizes:
        a, b = torch.randn(batch_size, i, device=device), torch.randn(i, o, device=device)
        torch.mm(a, b)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        synchronize(device)
        seconds += time.perf_counter() - start
        flops += 2 * batch_size * i * o * repeats
    return flops / seconds / 1e9


def torchvision_layout(data_dir: Path, root: Path) -> None:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        src = data_dir / f"{name}.gz"
        if src.is_file():
            (raw / name).write_bytes(gzip.decompress(src.read_bytes()))
        else:
            shutil.copy(data_dir / name, raw / name)


def measure(opts, batch_size: int, images: torch.Tensor, root: Path, flops: int) -> None:
    """Every path of ``opts.precisions`` at one batch size, alternating, best of ``opts.repeats``."""
    paths = [(name, p) for p in opts.precisions for name in ("ours", "loop-dl", "loop-mem") if name != "loop-dl" or p == "32"]
    rates: dict[tuple[str, str], list[float]] = {path: [] for path in paths}
    for _ in range(opts.repeats):
        for name, precision in paths:
            if name == "ours":
                rate = time_ours(opts.data_dir, batch_size, opts.steps, opts.warmup, precision, opts.val_size, opts.device)
            else:
                batches = dataloader_batches(root, batch_size, opts.device) if name == "loop-dl" else memory_batches(images, batch_size)
                rate = time_loop(batches, opts.steps, opts.warmup, precision, opts.device)
            rates[(name, precision)].append(rate * batch_size)
    gemm = gemm_gflops(batch_size, opts.device)

    where = torch.cuda.get_device_name() if opts.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{where}: batch {batch_size}, {opts.steps} timed steps after {opts.warmup} warm-up, best of {opts.repeats}, "
          f"{flops / 1e6:.1f} MFLOP per sample")
    best = {k: max(v) for k, v in rates.items()}
    for (name, precision), rate in best.items():
        print(f"{name:>9} {precision:>10}: {rate:9.0f} samples/s  {rate * flops / 1e9:7.1f} GFLOP/s  "
              f"({rate * flops / 1e9 / gemm:5.1%} of fp32 torch.mm's {gemm:.1f} GFLOP/s)")
    if ("loop-dl", "32") in best and ("ours", "32") in best:
        print(f"ours / loop-dl (32) = {best['ours', '32'] / best['loop-dl', '32']:.2f}")
    for precision in opts.precisions:
        print(f"ours / loop-mem ({precision}) = {best['ours', precision] / best['loop-mem', precision]:.2f}")
    if "bf16-mixed" in opts.precisions and "32" in opts.precisions:
        print(f"ours bf16-mixed / ours 32 = {best['ours', 'bf16-mixed'] / best['ours', '32']:.2f}")
        print(f"loop-mem bf16-mixed / loop-mem 32 = {best['loop-mem', 'bf16-mixed'] / best['loop-mem', '32']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[100], help="one block of figures per size")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out, as the DataModule does")
    parser.add_argument("--precisions", nargs="+", choices=("32", "bf16-mixed"), default=["32", "bf16-mixed"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    opts = parser.parse_args()
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    os.environ.setdefault("WANDB_MODE", "offline")
    L.seed_everything(0, verbose=False)

    from aae_lightning import FashionMNISTDataModule

    dm = FashionMNISTDataModule(data_dir=opts.data_dir, download=False, val_size=opts.val_size)
    dm.setup("fit")
    images = dm.splits["train"][0].to(opts.device)
    plain = PlainAAE()
    flops = flops_per_sample(linear_macs(plain.encoder), linear_macs(plain.decoder), linear_macs(plain.d_y) + linear_macs(plain.d_z))
    with tempfile.TemporaryDirectory() as root:
        torchvision_layout(Path(opts.data_dir), Path(root))
        for batch_size in opts.batch_size:
            measure(opts, batch_size, images, Path(root), flops)


if __name__ == "__main__":
    main()
