"""ImageNet-layout folders: ``ROOT/train/CLASS/*.JPEG`` and ``ROOT/val/CLASS/*.JPEG``.

JPEGs are decoded at reduced size when the crop is much smaller than the file
(libjpeg's DCT scaling through PIL's ``draft``), which cuts decode time several
fold for ImageNet-sized photos. An unreadable image is skipped and counted,
never fatal: one bad file must not end a 90-epoch run.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageFolderData(torch.utils.data.Dataset):
    """One split of an ImageNet-layout folder; items are (image tensor, label) or None if unreadable."""

    def __init__(self, split_dir: str | Path, image_size: int, train: bool,
                 classes: list[str] | None = None) -> None:
        split_dir = Path(split_dir)
        if not split_dir.is_dir():
            raise ValueError(f"data folder {split_dir} does not exist; expected ROOT/train/CLASS/*.JPEG "
                             "and ROOT/val/CLASS/*.JPEG (ImageNet layout)")
        self.classes = classes or sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"data folder {split_dir} has no class sub-folders; expected {split_dir}/CLASS/*.JPEG")
        self.samples = [(path, label) for label, name in enumerate(self.classes)
                        for path in sorted((split_dir / name).glob("*"))
                        if path.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise ValueError(f"data folder {split_dir} has class folders but no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.image_size, self.train = image_size, train
        self.num_classes = len(self.classes)
        self.transform = _transform(image_size, train)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        """``key`` is an index, or (index, seed): the seed fixes the random augmentation, so the
        same sample of the same epoch looks the same whichever worker loads it (exact resume)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            image = load_image(path, self.image_size)
        except (OSError, ValueError, SyntaxError):  # what PIL raises for truncated or foreign files
            return None
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label


def load_image(path: Path, target: int):
    """Open an image as RGB; JPEGs decode at the smallest DCT scale still >= 2x ``target``."""
    from PIL import Image

    with Image.open(path) as image:
        if image.format == "JPEG":
            image.draft("RGB", (2 * target, 2 * target))
        return image.convert("RGB")


def _transform(image_size: int, train: bool):
    from torchvision import transforms

    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def collate_skipping_bad(items: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable items of a batch; the third value counts the unreadable ones."""
    good = [item for item in items if item is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(items)
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, len(items) - len(good)


def limit_worker_threads(worker_id: int) -> None:
    """DataLoader workers decode with one thread each, leaving the cores to training."""
    torch.set_num_threads(1)


def folder_datasets(root: str | Path, image_size: int) -> tuple[ImageFolderData, ImageFolderData]:
    """Train and val splits of ``root``, with the class list taken from train."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data-dir {root} does not exist; point it at a folder with train/ and val/")
    train = ImageFolderData(root / "train", image_size, train=True)
    val = ImageFolderData(root / "val", image_size, train=False, classes=train.classes)
    return train, val
