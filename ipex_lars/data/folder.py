"""ImageNet-layout folders: ``ROOT/train/CLASS/*.JPEG`` and ``ROOT/val/CLASS/*.JPEG``.

JPEGs are decoded at reduced size when the crop is much smaller than the file
(libjpeg's DCT scaling through PIL's ``draft``), which cuts decode time several
fold for ImageNet-sized photos.

One bad file must not end (or hang) a 90-epoch run: an image that cannot be read
for any reason is skipped, counted, and recorded on its dataset as (path, reason),
which ``write_skipped`` saves as ``skipped.txt``. FIFOs, sockets, devices and
dangling symlinks are never opened, and an image over ``max_pixels`` is refused
from its header, before any pixel is decoded.
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
FORMATS = ("JPEG", "PNG", "BMP", "WEBP")  # what PIL may decode, whatever the suffix says
MAX_PIXELS = 64_000_000  # 192 MB decoded as RGB; a 24-megapixel camera photo is well under it
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_FILE_KINDS = {"d": "a directory", "p": "a FIFO", "s": "a socket", "c": "a character device", "b": "a block device"}


class SkippedImage(NamedTuple):
    """An image that could not be read, and why."""

    path: str
    reason: str


class ImageFolderData(torch.utils.data.Dataset):
    """One split of an ImageNet-layout folder; items are (image tensor, label), or a SkippedImage.

    ``skipped`` maps each unreadable file met so far to the reason; the batch loaders fill it in
    the main process, whichever DataLoader worker read the file.
    """

    def __init__(self, split_dir: str | Path, image_size: int, train: bool, max_pixels: int = MAX_PIXELS) -> None:
        split_dir = Path(split_dir)
        if not split_dir.is_dir():
            raise ValueError(
                f"data folder {split_dir} does not exist; expected ROOT/train/CLASS/*.JPEG "
                "and ROOT/val/CLASS/*.JPEG (ImageNet layout)"
            )
        self.classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"data folder {split_dir} has no class sub-folders; expected {split_dir}/CLASS/*.JPEG")
        self.samples = [
            (path, label) for label, name in enumerate(self.classes) for path in _class_images(split_dir / name)
        ]
        self.image_size, self.train, self.max_pixels = image_size, train, max_pixels
        self.num_classes = len(self.classes)
        self.channels = 3  # decoded as RGB
        self.transform = _transform(image_size, train)
        self.skipped: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | SkippedImage:
        """``key`` is an index, or (index, seed): the seed fixes the random augmentation, so the
        same sample of the same epoch looks the same whichever worker loads it (exact resume)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            image = load_image(path, self.image_size, self.max_pixels)
        except Exception as error:  # whatever PIL or the OS raises, one file must not end the run
            return SkippedImage(str(path), f"{type(error).__name__}: {error}")
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label

    def record_skips(self, skips: Iterable[SkippedImage]) -> None:
        """Remember each skipped file with the first reason it failed for."""
        for skip in skips:
            self.skipped.setdefault(skip.path, skip.reason)


def _class_images(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted; an empty class folder is an error."""
    images = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(
            f"class folder {folder} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add images"
        )
    return images


def load_image(path: Path, target: int, max_pixels: int = MAX_PIXELS):
    """Open an image as RGB; JPEGs decode at the smallest DCT scale still >= 2x ``target``.

    Raises if ``path`` is not a regular file, or has more than ``max_pixels`` pixels (read from
    the header, before decoding). PIL's own bomb limit, 2 x ``Image.MAX_IMAGE_PIXELS``, still
    raises above that.
    """
    from PIL import Image

    with _open_regular(path) as file, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels decides, below
        with Image.open(file, formats=FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"{width}x{height} pixels is over the {max_pixels:,}-pixel limit (max_pixels)")
            if image.format == "JPEG":
                image.draft("RGB", (2 * target, 2 * target))
            return image.convert("RGB")


def _open_regular(path: Path) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file; FIFOs, sockets and devices are never opened."""
    mode = os.stat(path).st_mode  # follows symlinks: a dangling one raises FileNotFoundError
    if not stat.S_ISREG(mode):
        raise ValueError(f"not a regular file but {_FILE_KINDS.get(stat.filemode(mode)[0], 'a special file')}")
    # non-blocking, so that a file swapped for a FIFO after the check still cannot hang the open
    return open(path, "rb", opener=lambda name, flags: os.open(name, flags | os.O_NONBLOCK))


def _transform(image_size: int, train: bool):
    from torchvision import transforms

    if train:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(image_size * 256 / 224)), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def collate_skipping_bad(items: list) -> tuple[torch.Tensor, torch.Tensor, list[SkippedImage]]:
    """Stack the readable items of a batch; the third value lists the unreadable ones."""
    skips = [item for item in items if isinstance(item, SkippedImage)]
    good = [item for item in items if not isinstance(item, SkippedImage)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skips
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, skips


def limit_worker_threads(worker_id: int) -> None:
    """DataLoader workers decode with one thread each, leaving the cores to training."""
    torch.set_num_threads(1)


def write_skipped(out_dir: str | Path, *datasets, rank: int = 0) -> Path | None:
    """Add the skipped files of ``datasets`` to ``OUT/skipped.txt`` (``skipped-rankN.txt`` on rank N > 0).

    One ``PATH<TAB>REASON`` line per file, merged with the lines already there, so a resumed run
    keeps the files named before it; tabs and newlines in either field are escaped. Datasets that
    are not image folders are ignored. Returns the file, or None if nothing was ever skipped.
    """
    path = Path(out_dir) / ("skipped.txt" if rank == 0 else f"skipped-rank{rank}.txt")
    records = dict(line.split("\t", 1) for line in _read_lines(path))
    for data in datasets:
        if isinstance(data, ImageFolderData):
            for file, reason in data.skipped.items():
                records.setdefault(_one_line(file), _one_line(reason))
    if not records:
        return None
    partial = path.with_name(path.name + ".partial")
    partial.write_text(
        "".join(f"{file}\t{reason}\n" for file, reason in records.items()), encoding="utf-8", errors="backslashreplace"
    )
    os.replace(partial, path)
    return path


def _read_lines(path: Path) -> list[str]:
    """The non-empty lines of ``path``, or none if it does not exist."""
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8", errors="backslashreplace").splitlines() if line]


def _one_line(text: str) -> str:
    """``text`` with tabs and line breaks escaped, to fit one field of a tab-separated line."""
    return text.translate({ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"})


def folder_datasets(
    root: str | Path, image_size: int, max_pixels: int = MAX_PIXELS
) -> tuple[ImageFolderData, ImageFolderData]:
    """Train and val splits of ``root``, which must have the same class folders."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data-dir {root} does not exist; point it at a folder with train/ and val/")
    train = ImageFolderData(root / "train", image_size, train=True, max_pixels=max_pixels)
    val = ImageFolderData(root / "val", image_size, train=False, max_pixels=max_pixels)
    if train.classes != val.classes:
        only_train, only_val = set(train.classes) - set(val.classes), set(val.classes) - set(train.classes)
        raise ValueError(
            f"{root}/train and {root}/val have different class folders (only in train: "
            f"{_some(only_train)}; only in val: {_some(only_val)}); give both the same class folders"
        )
    return train, val


def _some(names: set[str], shown: int = 5) -> str:
    """The first ``shown`` of ``names`` in sorted order, and how many more there are."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return (", ".join(sorted(names)[:shown]) or "none") + more
