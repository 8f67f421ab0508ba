"""Adversarial Autoencoders (Makhzani et al. 2015) as a PyTorch Lightning project."""

from aae_lightning.averaging import EMAWeights
from aae_lightning.callbacks import ClusterGrid, LatentPlot, PriorSamples, RepresentationMap, StyleGrid
from aae_lightning.checkpointing import AtomicCheckpointIO, BestCheckpoint, InterruptCheckpoint
from aae_lightning.codes import LatentCode
from aae_lightning.data import FashionMNISTDataModule, ImageDataModule, ImageFolderDataModule, MNISTDataModule, SVHNDataModule
from aae_lightning.likelihood import ParzenLikelihood
from aae_lightning.merging import MergedClusters
from aae_lightning.model import AdversarialAutoencoder
from aae_lightning.perturbations import RandomAffine, RandomElastic, RandomShift, VirtualAdversarial
from aae_lightning.predictions import PredictionWriter
from aae_lightning.priors import CategoricalPrior, GaussianMixturePrior, GaussianPrior, Prior, SwissRollPrior
from aae_lightning.runs import RunSummary
from aae_lightning.splitting import ClusterSplit
from aae_lightning.transforms import Deskew, ImageTransform, LoopFill, PenWidth
from aae_lightning.terms import Balance, CategoryRecovery, Consistency, HeadSeparation, InstanceContrast, InterpolationConsistency, MutualInformation, NeighbourAgreement, PairedMutualInformation, SelfLabelling, TrainingTerm

__all__ = [
    "AdversarialAutoencoder",
    "AtomicCheckpointIO",
    "Balance",
    "BestCheckpoint",
    "CategoricalPrior",
    "CategoryRecovery",
    "ClusterGrid",
    "ClusterSplit",
    "Consistency",
    "EMAWeights",
    "PairedMutualInformation",
    "NeighbourAgreement",
    "SelfLabelling",
    "FashionMNISTDataModule",
    "GaussianMixturePrior",
    "Deskew",
    "GaussianPrior",
    "HeadSeparation",
    "InstanceContrast",
    "InterpolationConsistency",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ImageTransform",
    "InterruptCheckpoint",
    "LatentCode",
    "LatentPlot",
    "LoopFill",
    "MergedClusters",
    "MNISTDataModule",
    "MutualInformation",
    "ParzenLikelihood",
    "PenWidth",
    "PredictionWriter",
    "Prior",
    "PriorSamples",
    "RandomAffine",
    "RandomElastic",
    "RandomShift",
    "RepresentationMap",
    "RunSummary",
    "StyleGrid",
    "SVHNDataModule",
    "SwissRollPrior",
    "TrainingTerm",
    "VirtualAdversarial",
]
