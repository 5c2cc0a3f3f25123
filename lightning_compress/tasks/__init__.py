"""What the CLI trains: data modules, models and a classification LightningModule.

The compression core does not depend on this package; a user's own LightningModule is the normal case.
"""

from lightning_compress.tasks.data import CIFAR10DataModule, DigitsDataModule, ImageFolderDataModule, MNIST1DDataModule
from lightning_compress.tasks.models import CNN1D, MLP, PixelTransformer, ResNet20, SmallCNN, torchvision_classifier
from lightning_compress.tasks.module import ClassificationModule

__all__ = [
    "CNN1D",
    "MLP",
    "CIFAR10DataModule",
    "ClassificationModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "MNIST1DDataModule",
    "PixelTransformer",
    "ResNet20",
    "SmallCNN",
    "torchvision_classifier",
]
