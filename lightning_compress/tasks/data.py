"""Data modules the CLI trains on. The plugin core never imports this package.

* :class:`DigitsDataModule` — scikit-learn's embedded digits (1,797 real 8×8 handwritten digits): the
  default, available on every machine without a download.
* :class:`ImageFolderDataModule` and :class:`CIFAR10DataModule` — need torchvision and the files on disk;
  both say so clearly, before training, when either is missing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_compress.core.checks import check_number

#: The label of a training sample whose label is withheld (``train_label_fraction``); losses ignore it.
UNLABELED = -1


def _check_fraction(name: str, value: float) -> float:
    return float(check_number(name, value, 0, 1, low_open=True, high_open=True))


def _check_batch_size(value: int) -> int:
    return int(check_number("batch_size", value, 1, integer=True))


def _require_torchvision(what: str) -> None:
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError(
            f"{what} needs torchvision, which is not installed. Install it with "
            "`pip install 'lightning-compress[vision]'` (it must match your torch build)."
        )


class EpochSeededSampler(Sampler[int]):
    """A random order that depends only on ``seed`` and the epoch (Lightning calls ``set_epoch``).

    A run resumed from a checkpoint at epoch k therefore sees the same batches as an uninterrupted one,
    which is what makes resume-equality hold with shuffling on.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class _LoadersMixin(pl.LightningDataModule):
    batch_size: int
    num_workers: int
    seed: int
    shuffle: bool
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset

    def train_dataloader(self) -> DataLoader:
        sampler = EpochSeededSampler(len(self.train_set), self.seed) if self.shuffle else None  # type: ignore[arg-type]
        return DataLoader(self.train_set, self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.batch_size, num_workers=self.num_workers)


class DigitsDataModule(_LoadersMixin):
    """scikit-learn's digits as ``1×8×8`` float images in [0, 1], split stratified into train/val/test.

    Args:
        batch_size: Samples per batch.
        val_fraction: Share of the data held out for validation.
        test_fraction: Share held out for the final test (never seen in training or model selection).
        seed: Seed of the split and of the shuffling.
        shuffle: Shuffle the training set each epoch.
        num_workers: DataLoader workers (0: in the main process; the data set is 0.9 MB in memory).
        train_label_fraction: Keep the labels of only this share of the training samples (stratified); the others
            keep their images with the label -1 (:data:`UNLABELED`), which the classification loss ignores — so a
            distilling teacher can still teach on them (label-scarce experiments).
    """

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        train_label_fraction: float = 1.0,
    ) -> None:
        super().__init__()
        self.batch_size = _check_batch_size(batch_size)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.test_fraction = _check_fraction("test_fraction", test_fraction)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(f"`val_fraction` + `test_fraction` must be < 1, got {val_fraction} + {test_fraction}.")
        if not 0.0 < train_label_fraction <= 1.0:
            raise ValueError(f"`train_label_fraction` must be in (0, 1], got {train_label_fraction!r}.")
        self.train_label_fraction = train_label_fraction
        self.seed, self.shuffle, self.num_workers = int(seed), bool(shuffle), int(num_workers)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images.astype(np.float32) / 16.0)[:, None]
        y = digits.target.astype(np.int64)
        idx = np.arange(len(y))
        rest, test = train_test_split(idx, test_size=self.test_fraction, stratify=y, random_state=self.seed)
        val_share = self.val_fraction / (1.0 - self.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=y[rest], random_state=self.seed)
        y_train = y.copy()
        if self.train_label_fraction < 1.0:
            _, unlabeled = train_test_split(
                train, train_size=self.train_label_fraction, stratify=y[train], random_state=self.seed
            )
            y_train[unlabeled] = UNLABELED

        def subset(ids: np.ndarray, labels: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.from_numpy(x[ids]), torch.from_numpy(labels[ids]))

        self.train_set = subset(train, y_train)
        self.val_set, self.test_set = subset(val, y), subset(test, y)


class MNIST1DDataModule(_LoadersMixin):
    """MNIST-1D (Greydanus 2020): the ten digit templates as 1-D signals of length 40, shifted, scaled, sheared and
    noised — a small task on which compression visibly costs accuracy (unlike the 8×8 digits). Generated offline by
    the ``mnist1d`` package (``make_dataset``; its ``get_dataset`` would download): ``num_samples`` signals, the last
    20 % the test split of the paper's set; ``val_fraction`` of the rest held out for validation (stratified).

    Args:
        batch_size: Samples per batch.
        val_fraction: Share of the training signals held out for validation.
        num_samples: Signals generated (5,000 in the paper: 4,000 train, 1,000 test).
        data_seed: Seed of the generator (42: the paper's data set).
        seed: Seed of the validation split and of the shuffling.
        shuffle: Shuffle the training set each epoch.
        num_workers: DataLoader workers.
    """

    input_shape = (1, 40)
    num_classes = 10

    def __init__(
        self,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        num_samples: int = 5000,
        data_seed: int = 42,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if importlib.util.find_spec("mnist1d") is None:
            raise ImportError(
                "MNIST1DDataModule needs the `mnist1d` package: `pip install 'lightning-compress[mnist1d]'`."
            )
        self.batch_size = _check_batch_size(batch_size)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.num_samples = int(check_number("num_samples", num_samples, 100, integer=True))
        self.data_seed = int(check_number("data_seed", data_seed, integer=True))
        self.seed, self.shuffle, self.num_workers = int(seed), bool(shuffle), int(num_workers)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from mnist1d.data import get_dataset_args, make_dataset
        from sklearn.model_selection import train_test_split

        args = get_dataset_args()
        args.num_samples, args.seed = self.num_samples, self.data_seed
        data = make_dataset(args)
        x, y = data["x"].astype(np.float32)[:, None], data["y"].astype(np.int64)
        train, val = train_test_split(
            np.arange(len(y)), test_size=self.val_fraction, stratify=y, random_state=self.seed
        )  # fmt: skip
        self.train_set = TensorDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train]))
        self.val_set = TensorDataset(torch.from_numpy(x[val]), torch.from_numpy(y[val]))
        x_test = data["x_test"].astype(np.float32)[:, None]
        self.test_set = TensorDataset(torch.from_numpy(x_test), torch.from_numpy(data["y_test"].astype(np.int64)))


class ImageFolderDataModule(_LoadersMixin):
    """Images in ``root/{train,val,test}/<class>/*.png`` (torchvision's ImageFolder layout), resized.

    ``val`` and ``test`` may be absent: a split is then carved out of ``train`` (seeded).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        _require_torchvision("ImageFolderDataModule")
        self.root = Path(root).expanduser()
        train_dir = self.root / "train"
        if not train_dir.is_dir():
            raise FileNotFoundError(
                f"ImageFolderDataModule: `root` {str(self.root)!r} has no 'train/' folder of class "
                "sub-folders (expected root/train/<class>/<image>)."
            )
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        if len(classes) < 2:
            raise FileNotFoundError(
                f"ImageFolderDataModule: {str(train_dir)!r} holds {len(classes)} class folders; need 2 or more."
            )
        self.num_classes = len(classes)
        self.input_shape = (3, image_size, image_size)
        self.image_size, self.batch_size = image_size, _check_batch_size(batch_size)
        self.val_fraction = _check_fraction("val_fraction", val_fraction)
        self.seed, self.shuffle, self.num_workers = int(seed), bool(shuffle), int(num_workers)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from torch.utils.data import random_split
        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.Resize((self.image_size, self.image_size)), transforms.ToTensor()])
        train = datasets.ImageFolder(str(self.root / "train"), transform=tf)
        generator = torch.Generator().manual_seed(self.seed)
        if (self.root / "val").is_dir():
            self.train_set, self.val_set = train, datasets.ImageFolder(str(self.root / "val"), transform=tf)
        else:
            n_val = max(1, int(len(train) * self.val_fraction))
            self.train_set, self.val_set = random_split(train, [len(train) - n_val, n_val], generator)
        test_dir = self.root / "test"
        self.test_set = datasets.ImageFolder(str(test_dir), transform=tf) if test_dir.is_dir() else self.val_set


class CIFAR10DataModule(_LoadersMixin):
    """CIFAR-10 from torchvision, read from ``root`` (nothing is downloaded: the files must be there)."""

    input_shape = (3, 32, 32)
    num_classes = 10

    def __init__(
        self,
        root: str,
        batch_size: int = 128,
        val_size: int = 5000,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 2,
    ) -> None:
        super().__init__()
        _require_torchvision("CIFAR10DataModule")
        self.root = Path(root).expanduser()
        if not (self.root / "cifar-10-batches-py").is_dir():
            raise FileNotFoundError(
                f"CIFAR10DataModule: no 'cifar-10-batches-py' folder under `root` {str(self.root)!r}. "
                "Download CIFAR-10 (python version) there first; this package never downloads data."
            )
        self.batch_size, self.val_size = _check_batch_size(batch_size), int(val_size)
        self.seed, self.shuffle, self.num_workers = int(seed), bool(shuffle), int(num_workers)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from torch.utils.data import Subset, random_split
        from torchvision import datasets, transforms

        norm = transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        train_tf = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                norm,
            ]
        )
        eval_tf = transforms.Compose([transforms.ToTensor(), norm])
        full = datasets.CIFAR10(str(self.root), train=True, transform=train_tf, download=False)
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, val = random_split(full, [len(full) - self.val_size, self.val_size], generator)
        # the same held-out images, without the training augmentation
        plain = datasets.CIFAR10(str(self.root), train=True, transform=eval_tf, download=False)
        self.val_set = Subset(plain, val.indices)
        self.test_set = datasets.CIFAR10(str(self.root), train=False, transform=eval_tf, download=False)
