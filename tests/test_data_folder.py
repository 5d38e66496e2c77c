"""ImageNet-layout folders built from scikit-learn's two sample photos (real JPEGs), plus bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cli_runner import run_cli
from ipex_lars.data.folder import ImageFolderData, load_image
from ipex_lars.train import checkpoint
from ipex_lars.train.config import load_config
from ipex_lars.train.engine import train

@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("imagenet")
    photos = load_sample_images().images  # china.jpg, flower.jpg: 427 x 640
    for split, count in (("train", 8), ("val", 2)):
        for label, photo in zip(("china", "flower"), photos):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                y, x = 20 * i, 30 * i
                Image.fromarray(photo[y:y + 300, x:x + 400]).save(folder / f"{label}_{i}.JPEG", quality=90)
    good = (root / "train" / "china" / "china_0.JPEG").read_bytes()
    (root / "train" / "china" / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (root / "train" / "flower" / "notes.JPEG").write_text("not an image")
    return root


def _cfg(tmp_path, root, **kw):
    values = dict(data="imagefolder", data_dir=str(root), image_size=32, model="digits_cnn", global_batch=6,
                  epochs=2, out_dir=str(tmp_path), threads=1, workers=0, lr=1.0, checkpoint_every=1)
    values.update(kw)
    return load_config("digits", values)


def test_folder_lists_classes_and_images(image_root):
    data = ImageFolderData(image_root / "train", 32, train=True)
    assert data.classes == ["china", "flower"] and len(data) == 18
    image, label = data[(1, 123)]
    assert image.shape == (3, 32, 32) and label == 0
    assert torch.equal(data[(1, 123)][0], image), "the seed fixes the augmentation"
    assert data[data.samples.index((image_root / "train" / "china" / "truncated.JPEG", 0))] is None


def test_large_jpeg_decodes_at_reduced_size(tmp_path):
    from PIL import Image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (1600, 1200), (200, 30, 30)).save(big)
    assert load_image(big, 224).size == (800, 600)  # libjpeg's 1/2 scale: still >= 2 x 224
    assert load_image(big, 1000).size == (1600, 1200)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_skips_and_counts_unreadable_images(tmp_path, image_root, workers):
    result = train(_cfg(tmp_path, image_root, workers=workers))
    assert result["steps"] == 6
    assert result["skipped_images"] >= 1


def test_resume_on_folder_data_is_exact_with_workers(tmp_path, image_root):
    train(_cfg(tmp_path / "a", image_root, workers=2))
    train(_cfg(tmp_path / "b", image_root, workers=2, max_steps=4))
    train(_cfg(tmp_path / "b", image_root, workers=2, resume="auto"))
    a = checkpoint.load(tmp_path / "a" / "ckpt-00000006.pt")["model"]
    b = checkpoint.load(tmp_path / "b" / "ckpt-00000006.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make,message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: root.mkdir() or root, "train does not exist"),
    (lambda root: (root / "train" / "a").mkdir(parents=True) or (root / "val").mkdir() or root, "no images"),
])
def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path, make, message):
    root = make(tmp_path / "data")
    out = run_cli("train", "--data", "imagefolder", "--data-dir", str(root), "--out-dir", str(tmp_path / "run"),
                  env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
