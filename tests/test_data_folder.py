"""ImageNet-layout folders built from scikit-learn's two sample photos (real JPEGs), plus bad files:
truncated, corrupt, too many pixels, decompression bombs, FIFOs, devices, dangling links, no permission."""

from __future__ import annotations

import os
import signal
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli

from ipex_lars import cli
from ipex_lars.data import TensorData, eval_batches, write_skipped
from ipex_lars.data.folder import ImageFolderData, SkippedImage, folder_datasets, load_image
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
                Image.fromarray(photo[y : y + 300, x : x + 400]).save(folder / f"{label}_{i}.JPEG", quality=90)
    good = (root / "train" / "china" / "china_0.JPEG").read_bytes()
    (root / "train" / "china" / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (root / "train" / "flower" / "notes.JPEG").write_text("not an image")
    return root


def _cfg(tmp_path, root, **kw):
    values = dict(
        data="imagefolder",
        data_dir=str(root),
        image_size=32,
        model="digits_cnn",
        global_batch=6,
        epochs=2,
        out_dir=str(tmp_path),
        threads=1,
        workers=0,
        lr=1.0,
        checkpoint_every=1,
    )
    values.update(kw)
    return load_config("digits", values)


def test_folder_lists_classes_and_images(image_root):
    data = ImageFolderData(image_root / "train", 32, train=True)
    assert data.classes == ["china", "flower"] and len(data) == 18
    image, label = data[(1, 123)]
    assert image.shape == (3, 32, 32) and label == 0
    assert torch.equal(data[(1, 123)][0], image), "the seed fixes the augmentation"
    skip = data[data.samples.index((image_root / "train" / "china" / "truncated.JPEG", 0))]
    assert isinstance(skip, SkippedImage) and "truncated" in skip.reason


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


def test_a_training_run_names_every_skipped_file_and_counts_val_skips(tmp_path, bad_root):
    with _deadline(120):  # the FIFOs must not hang the run
        result = train(_cfg(tmp_path, bad_root, global_batch=15, epochs=1, image_size=16))
    named = dict(line.split("\t", 1) for line in (tmp_path / "skipped.txt").read_text().splitlines())
    assert str(bad_root / "train" / "cat" / "pipe.JPEG") in named
    assert str(bad_root / "val" / "cat" / "pipe.jpg") in named
    assert result["skipped_images"] >= 1
    records = (tmp_path / "metrics-rank0.jsonl").read_text().splitlines()
    assert '"val_skipped_images": 3' in records[-1]  # the FIFO, the truncated file and the oversized link


def test_resume_on_folder_data_is_exact_with_workers(tmp_path, image_root):
    train(_cfg(tmp_path / "a", image_root, workers=2))
    train(_cfg(tmp_path / "b", image_root, workers=2, max_steps=4))
    train(_cfg(tmp_path / "b", image_root, workers=2, resume="auto"))
    a = checkpoint.load(tmp_path / "a" / "ckpt-00000006.pt")["model"]
    b = checkpoint.load(tmp_path / "b" / "ckpt-00000006.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda root: root / "missing", "--data-dir {root} does not exist; point it at a folder with train/ and val/"),
        (
            lambda root: root.mkdir() or root,
            "data folder {root}/train does not exist; expected ROOT/train/CLASS/*.JPEG "
            "and ROOT/val/CLASS/*.JPEG (ImageNet layout)",
        ),
        (
            lambda root: (root / "train" / "a").mkdir(parents=True) or (root / "val").mkdir() or root,
            "class folder {root}/train/a has no images (.bmp, .jpeg, .jpg, .png, .webp); remove it or add images",
        ),
    ],
)
def test_missing_or_empty_data_folder_is_a_clear_error(tmp_path, make, message, capsys):
    root = make(tmp_path / "data")
    code = cli.main(
        [
            "train",
            "--data",
            "imagefolder",
            "--data-dir",
            str(root),
            "--out-dir",
            str(tmp_path / "run"),
            "--threads",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1] == "ipex-lars train: error: " + message.format(root=root), err
    assert "Traceback" not in err


def test_a_missing_data_folder_ends_the_installed_command_with_exit_2(tmp_path):
    out = run_cli(
        "train",
        "--data",
        "imagefolder",
        "--data-dir",
        str(tmp_path / "missing"),
        "--out-dir",
        str(tmp_path / "run"),
        env={"OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[-1] == (
        f"ipex-lars train: error: --data-dir {tmp_path / 'missing'} does not exist; "
        "point it at a folder with train/ and val/"
    )
    assert "Traceback" not in out.stderr


@contextmanager
def _deadline(seconds: float):
    """Fail the test, instead of hanging the suite, if the block runs longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"loading took over {seconds} s: something blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _write_blank_png(path: Path, width: int, height: int) -> None:
    """A valid all-black 1-bit PNG: ~20 KB on disk however large, built without ever holding its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


def _small_images(folder: Path, suffix: str, count: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.effect_noise((96, 64), 40 + 10 * i).convert("RGB").save(folder / f"good_{i}{suffix}")


# file name -> what its skip reason says; in train/cat unless the name says otherwise
TRAIN_BAD = {
    "truncated.JPEG": "truncated",
    "notes.JPEG": "UnidentifiedImageError",
    "tiff.JPEG": "UnidentifiedImageError",
    "huge.png": "12000x12000 pixels is over the 64,000,000-pixel",
    "bomb.png": "DecompressionBombError",
    "pipe.JPEG": "not a regular file but a FIFO",
    "zero.JPEG": "not a regular file but a character device",
    "dangling.JPEG": "FileNotFoundError",
    "subdir.JPEG": "not a regular file but a directory",
}
VAL_BAD = {"cat/pipe.jpg": "FIFO", "cat/truncated.jpg": "truncated", "dog/huge.png": "pixel limit"}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory) -> Path:
    """train/{cat,dog} and val/{cat,dog} with 3 and 2 good images a class, and every kind of bad file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bad")
    for split, count in (("train", 3), ("val", 2)):
        _small_images(root / split / "cat", ".JPEG", count)
        _small_images(root / split / "dog", ".png", count)
    cat = root / "train" / "cat"
    noise = Image.effect_noise((256, 256), 60)
    noise.save(cat / "noise.jpg")
    good = (cat / "noise.jpg").read_bytes()
    (cat / "noise.jpg").unlink()
    (cat / "truncated.JPEG").write_bytes(good[: len(good) // 3])
    (cat / "notes.JPEG").write_text("not an image")
    noise.save(cat / "tiff.JPEG", format="TIFF")  # a real image, in a format PIL is not allowed to decode here
    _write_blank_png(cat / "huge.png", 12000, 12000)  # 144 MP: over max_pixels, within PIL's own bomb limit
    _write_blank_png(cat / "bomb.png", 14000, 14000)  # 196 MP: PIL itself raises DecompressionBombError
    os.mkfifo(cat / "pipe.JPEG")
    (cat / "zero.JPEG").symlink_to("/dev/zero")
    (cat / "dangling.JPEG").symlink_to(cat / "gone.JPEG")
    (cat / "subdir.JPEG").mkdir()
    os.mkfifo(root / "val" / "cat" / "pipe.jpg")
    (root / "val" / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "val" / "dog" / "huge.png").symlink_to(cat / "huge.png")  # a link to a regular file is followed
    return root


def _load_all(data: ImageFolderData, workers: int = 0) -> tuple[int, int]:
    """Readable and skipped images in one pass over ``data``, failing if it takes over 60 s."""
    with _deadline(60), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(eval_batches(data, batch=4, workers=workers))
    assert not [w for w in caught if "DecompressionBomb" in w.category.__name__]
    return sum(len(labels) for _, labels, _ in batches), sum(skipped for _, _, skipped in batches)


def test_every_bad_file_is_skipped_named_and_counted_in_train_and_val(bad_root):
    train, val = folder_datasets(bad_root, 32)
    assert train.classes == val.classes == ["cat", "dog"]
    assert _load_all(train) == (6, len(TRAIN_BAD))
    assert set(train.skipped) == {str(bad_root / "train" / "cat" / name) for name in TRAIN_BAD}
    for name, reason in TRAIN_BAD.items():
        assert reason in train.skipped[str(bad_root / "train" / "cat" / name)], name
    assert _load_all(val) == (4, len(VAL_BAD))
    assert set(val.skipped) == {str(bad_root / "val" / name) for name in VAL_BAD}
    for name, reason in VAL_BAD.items():
        assert reason in val.skipped[str(bad_root / "val" / name)], name
    _load_all(val)
    assert len(val.skipped) == len(VAL_BAD), "a file skipped every epoch is recorded once"


def test_skips_in_worker_processes_are_recorded_in_the_main_process(bad_root):
    val = ImageFolderData(bad_root / "val", 32, train=False)
    assert _load_all(val, workers=2) == (4, len(VAL_BAD))
    assert set(val.skipped) == {str(bad_root / "val" / name) for name in VAL_BAD}


def test_skipped_txt_names_each_file_once_per_rank_and_keeps_earlier_lines(bad_root, tmp_path):
    train, val = folder_datasets(bad_root, 32)
    _load_all(train)
    assert write_skipped(tmp_path, TensorData(torch.zeros(1), torch.zeros(1), 1), val) is None
    path = write_skipped(tmp_path, train, val)
    assert path == tmp_path / "skipped.txt"
    lines = path.read_text().splitlines()
    assert len(lines) == len(TRAIN_BAD) and all(line.count("\t") == 1 for line in lines)
    assert dict(line.split("\t") for line in lines) == train.skipped
    _load_all(val)
    resumed_val = ImageFolderData(bad_root / "val", 32, train=False)  # a resumed run starts with no records
    _load_all(resumed_val)
    write_skipped(tmp_path, resumed_val)
    assert dict(line.split("\t") for line in path.read_text().splitlines()) == {**train.skipped, **val.skipped}
    assert write_skipped(tmp_path, val, rank=3) == tmp_path / "skipped-rank3.txt"


def test_pixel_limit_is_a_parameter_checked_before_decoding(bad_root):
    good = bad_root / "train" / "dog" / "good_0.png"
    with pytest.raises(ValueError, match="96x64 pixels is over the 6,000-pixel limit"):
        load_image(good, 32, max_pixels=6000)
    assert load_image(good, 32, max_pixels=96 * 64).size == (96, 64)


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root, which reads any file whatever its permissions")
def test_an_image_without_read_permission_is_skipped(tmp_path):
    _small_images(tmp_path / "train" / "cat", ".png", 2)
    locked = tmp_path / "train" / "cat" / "good_1.png"
    locked.chmod(0)
    data = ImageFolderData(tmp_path / "train", 32, train=False)
    assert _load_all(data) == (1, 1)
    assert "PermissionError" in data.skipped[str(locked)]


@pytest.mark.parametrize("split", ["train", "val"])
def test_an_empty_class_folder_is_an_error_naming_it(tmp_path, split):
    for name in ("train", "val"):
        _small_images(tmp_path / name / "cat", ".png", 1)
    (tmp_path / split / "empty").mkdir()
    (tmp_path / split / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(
        ValueError, match=f"class folder {tmp_path / split / 'empty'} has no images .*; remove it or add images$"
    ):
        folder_datasets(tmp_path, 32)


def test_train_and_val_must_have_the_same_classes(tmp_path):
    for split, names in (("train", ("cat", "dog")), ("val", ("cat", "fox"))):
        for name in names:
            _small_images(tmp_path / split / name, ".png", 1)
    with pytest.raises(ValueError, match="only in train: dog; only in val: fox\\); give both the same class"):
        folder_datasets(tmp_path, 32)
