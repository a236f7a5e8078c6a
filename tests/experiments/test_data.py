"""Tests for trainact.experiments.data: embedded subset, folders/archives, CIFAR archives, cache."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from trainact.experiments import data
from trainact.experiments.data import (
    DATASET_NAMES,
    ImageDataset,
    default_cache_dir,
    load_dataset,
    stratified_subset,
)

SHARED_ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared/data/cifar10-jpeg.tar.gz"
CLASSES = ["ant", "bee", "cow"]
# Class c's images are filled with COLOURS[c] plus the image's index, so pixels identify labels.
COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200)]


@pytest.fixture(autouse=True)
def temporary_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every test away from the user's real cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRAINACT_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def subset_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("subset-cache")


@pytest.fixture(scope="module")
def subset(subset_cache: Path) -> ImageDataset:
    """The embedded subset, decoded once for the whole module (cold load)."""
    return load_dataset("cifar10-subset", subset_cache, progress=False)


def assert_well_formed(ds: ImageDataset) -> None:
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        assert images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] == 3
        assert images.is_contiguous()
        assert labels.dtype == torch.int64 and labels.shape == images.shape[:1]
        assert 0 <= int(labels.min()) and int(labels.max()) < len(ds.classes)
    assert len(ds.mean) == 3 and len(ds.std) == 3


# ----------------------------------------------------------------------------------------------
# Embedded subset


def test_embedded_subset(subset: ImageDataset) -> None:
    assert_well_formed(subset)
    assert subset.name == "cifar10-subset"
    assert subset.classes == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    assert subset.train_images.shape == (10_000, 3, 32, 32)
    assert subset.test_images.shape == (2_000, 3, 32, 32)
    assert subset.train_labels.bincount().tolist() == [1000] * 10
    assert subset.test_labels.bincount().tolist() == [200] * 10
    assert subset.mean == pytest.approx((0.49, 0.48, 0.45), abs=0.02)
    assert subset.std == pytest.approx((0.247, 0.243, 0.261), abs=0.02)
    # The images are stored shuffled, not grouped by class.
    assert len(set(subset.train_labels[:50].tolist())) > 5


def test_embedded_subset_warm_load_uses_cache(
    subset: ImageDataset, subset_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(list(subset_cache.glob("cifar10-subset-*.npz"))) == 1
    monkeypatch.setattr(data, "_decode", pytest.fail)  # a warm load must not decode
    start = time.perf_counter()
    warm = load_dataset("cifar10-subset", subset_cache, progress=False)
    assert time.perf_counter() - start < 5
    assert torch.equal(warm.train_images, subset.train_images)
    assert torch.equal(warm.test_labels, subset.test_labels)
    assert warm.mean == subset.mean


def test_train_subset(subset_cache: Path) -> None:
    ds = load_dataset("cifar10-subset", subset_cache, train_subset=105, seed=3, progress=False)
    assert ds.train_images.shape == (105, 3, 32, 32)
    assert ds.train_labels.bincount().tolist() == [11] * 5 + [10] * 5
    assert ds.test_images.shape[0] == 2_000
    assert ds.mean == pytest.approx(data._channel_stats(ds.train_images.numpy())[0])
    with pytest.raises(ValueError, match="exceeds"):
        load_dataset("cifar10-subset", subset_cache, train_subset=10_001, progress=False)


def test_default_cache_dir(temporary_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_cache_dir() == temporary_cache
    monkeypatch.delenv("TRAINACT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "trainact"


# ----------------------------------------------------------------------------------------------
# stratified_subset


def test_stratified_subset_balanced_and_reproducible() -> None:
    labels = torch.arange(4).repeat_interleave(25)[torch.randperm(100)]
    index = stratified_subset(labels, 42, seed=7)
    assert index.dtype == torch.int64
    assert torch.equal(index, index.sort().values) and len(index.unique()) == 42
    assert labels[index].bincount().tolist() == [11, 11, 10, 10]
    assert torch.equal(index, stratified_subset(labels, 42, seed=7))
    assert not torch.equal(index, stratified_subset(labels, 42, seed=8))


def test_stratified_subset_small_class_gives_its_share_to_others() -> None:
    labels = torch.tensor([0] * 2 + [1] * 10 + [2] * 10)
    assert labels[stratified_subset(labels, 15, seed=0)].bincount().tolist() == [2, 7, 6]
    assert len(stratified_subset(labels, 22, seed=0)) == 22
    labels = torch.tensor([0] + [1] * 4 + [2] * 10)
    assert labels[stratified_subset(labels, 5, seed=0)].bincount().tolist() == [1, 2, 2]


@pytest.mark.parametrize("n", [0, -1, 23, 2.5, True])
def test_stratified_subset_bad_n(n: object) -> None:
    with pytest.raises(ValueError, match="subset size"):
        stratified_subset(torch.zeros(22, dtype=torch.int64), n, seed=0)  # type: ignore[arg-type]


def test_stratified_subset_needs_1d_labels() -> None:
    with pytest.raises(ValueError, match="1-D"):
        stratified_subset(torch.zeros(2, 3, dtype=torch.int64), 2, seed=0)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    fraction=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_stratified_subset_properties(counts: list[int], fraction: float, seed: int) -> None:
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    n = max(1, round(fraction * len(labels)))
    index = stratified_subset(labels, n, seed)
    assert len(index) == n and len(index.unique()) == n
    taken = labels[index].bincount(minlength=len(counts)).tolist()
    # No class holds more than one sample over a class that still had samples to give.
    open_counts = [t for t, c in zip(taken, counts, strict=True) if t < c]
    if open_counts:
        assert max(taken) - min(open_counts) <= 1


# ----------------------------------------------------------------------------------------------
# Image folders and archives


def make_image_folder(root: Path, fmt: str = "png", size: tuple[int, int] = (8, 6)) -> Path:
    """3 classes x (5 train + 2 test) tiny images whose colour encodes class and index."""
    for split, count in (("train", 5), ("test", 2)):
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                colour = tuple(v + i for v in COLOURS[c])
                Image.new("RGB", size, colour).save(root / split / cls / f"{i:03d}.{fmt}")
    (root / "README.txt").write_text("not an image")
    return root


def expected_labels(count: int) -> list[int]:
    return [c for c in range(len(CLASSES)) for _ in range(count)]


def make_tar(folder: Path, archive: Path, top: str | None = "dataset") -> Path:
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tar:
        for split in ("train", "test"):
            tar.add(folder / split, arcname=f"{top}/{split}" if top else split)
    return archive


def test_image_folder_loads(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    ds = load_dataset(folder, progress=False)
    assert_well_formed(ds)
    assert ds.name == "tiny" and ds.classes == CLASSES
    assert ds.train_images.shape == (15, 3, 6, 8) and ds.test_images.shape == (6, 3, 6, 8)
    assert ds.train_labels.tolist() == expected_labels(5)
    assert ds.test_labels.tolist() == expected_labels(2)
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        colours = images[:, :, 0, 0].long()
        assert (colours.argmax(dim=1) == labels).all()
    assert ds.train_images[1, :, 3, 4].tolist() == [201, 11, 11]
    expected_mean = ds.train_images.double().mean(dim=(0, 2, 3)) / 255
    assert ds.mean == pytest.approx(expected_mean.tolist())
    expected_std = (ds.train_images.double() / 255).std(dim=(0, 2, 3), unbiased=False)
    assert ds.std == pytest.approx(expected_std.tolist())


@pytest.mark.parametrize(
    ("archive_name", "top"),
    [("tiny.tar.gz", "dataset"), ("tiny.tgz", None), ("tiny.tar", "dataset")],
)
def test_archive_loads_like_folder(tmp_path: Path, archive_name: str, top: str | None) -> None:
    folder = make_image_folder(tmp_path / "tiny", fmt="jpg")
    from_folder = load_dataset(str(folder), progress=False)
    ds = load_dataset(str(make_tar(folder, tmp_path / archive_name, top)), progress=False)
    assert ds.name == "tiny" and ds.classes == CLASSES
    assert ds.train_labels.tolist() == expected_labels(5)
    assert torch.equal(ds.train_images, from_folder.train_images)
    assert torch.equal(ds.test_images, from_folder.test_images)


def test_truncated_archive(tmp_path: Path) -> None:
    archive = make_tar(make_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar.gz")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"tiny\.tar\.gz.*truncated or corrupt"):
        load_dataset(archive, progress=False)


def test_tar_cut_between_members_is_not_a_silent_partial_dataset(tmp_path: Path) -> None:
    archive = make_tar(make_image_folder(tmp_path / "tiny"), tmp_path / "tiny.tar")
    with tarfile.open(archive) as tar:
        last_header = tar.getmembers()[-1].offset
    archive.write_bytes(archive.read_bytes()[:last_header])
    with pytest.raises(ValueError, match="end-of-archive"):
        load_dataset(archive, progress=False)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    (folder / "train" / "bee" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"cannot decode image .*bee/002\.png"):
        load_dataset(folder, progress=False)


def test_truncated_image_in_archive_names_the_member(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny", fmt="jpg")
    jpeg = folder / "test" / "cow" / "001.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    archive = make_tar(folder, tmp_path / "tiny.tar.gz")
    with pytest.raises(ValueError, match=r"tiny\.tar\.gz:dataset/test/cow/001\.jpg"):
        load_dataset(archive, progress=False)


def test_mixed_image_sizes_name_the_file(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    Image.new("RGB", (9, 6)).save(folder / "test" / "ant" / "001.png")
    with pytest.raises(ValueError, match=r"ant/001\.png is 9x6 .* same size"):
        load_dataset(folder, progress=False)


def test_train_and_test_classes_must_match(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    (folder / "test" / "dog").mkdir()
    Image.new("RGB", (8, 6)).save(folder / "test" / "dog" / "0.png")
    with pytest.raises(ValueError, match=r"only in test: \['dog'\]"):
        load_dataset(folder, progress=False)


def test_folder_without_layout(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        load_dataset(tmp_path / "empty", progress=False)


def test_grayscale_and_palette_images_become_rgb(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    Image.new("L", (8, 6), 77).save(folder / "train" / "ant" / "000.png")
    Image.new("P", (8, 6)).save(folder / "train" / "ant" / "001.png")
    ds = load_dataset(folder, progress=False)
    assert ds.train_images[0, :, 0, 0].tolist() == [77, 77, 77]


# ----------------------------------------------------------------------------------------------
# Cache


def test_cache_is_keyed_by_source(tmp_path: Path, temporary_cache: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    load_dataset(folder, progress=False)
    assert len(list(temporary_cache.glob("tiny-*.npz"))) == 1
    Image.new("RGB", (8, 6), (1, 2, 3)).save(folder / "train" / "ant" / "000.png")
    ds = load_dataset(folder, progress=False)  # changed file: new key, no stale data
    assert ds.train_images[0, :, 0, 0].tolist() == [1, 2, 3]
    assert len(list(temporary_cache.glob("tiny-*.npz"))) == 2
    assert not list(temporary_cache.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong labels"])
def test_corrupt_cache_is_rebuilt(
    tmp_path: Path, temporary_cache: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    first = load_dataset(folder, progress=False)
    (cache_file,) = temporary_cache.glob("tiny-*.npz")
    if damage == "garbage":
        cache_file.write_bytes(b"not a zip file at all")
    elif damage == "truncate":
        cache_file.write_bytes(cache_file.read_bytes()[:1000])
    else:
        with np.load(cache_file) as z:
            arrays = dict(z)
        arrays["train_labels"] = arrays["train_labels"][:-1]
        with cache_file.open("wb") as f:
            np.savez(f, **arrays)
    with pytest.warns(RuntimeWarning, match="corrupt.*rebuilding"):
        again = load_dataset(folder, progress=False)
    assert torch.equal(again.train_images, first.train_images)
    assert torch.equal(again.train_labels, first.train_labels)
    monkeypatch.setattr(data, "_decode", pytest.fail)  # the rebuilt cache is valid
    assert torch.equal(load_dataset(folder, progress=False).test_images, first.test_images)


def test_unwritable_cache_still_returns_data(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "tiny")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache directory should be")
    with pytest.warns(RuntimeWarning, match="could not write dataset cache"):
        ds = load_dataset(folder, blocker, progress=False)
    assert ds.train_labels.tolist() == expected_labels(5)


# ----------------------------------------------------------------------------------------------
# Official CIFAR archives (fakes in the official format)


def fake_official_archive(path: Path, name: str) -> tuple[Path, np.ndarray, np.ndarray]:
    """A tiny archive laid out like the official one; returns it with train data and labels."""
    spec = data._OFFICIAL[name]
    rng = np.random.default_rng(0)
    n_classes = 10 if name == "cifar10" else 100
    members: dict[str, dict] = {
        spec.meta_member: {spec.classes_key: [f"class{i:02d}" for i in range(n_classes)]}
    }
    train_data, train_labels = [], []
    for member in (*spec.train_members, *spec.test_members):
        images = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)
        labels = rng.integers(0, n_classes, size=4).tolist()
        members[member] = {"data": images, spec.labels_key: labels, "filenames": ["x.png"] * 4}
        if member in spec.train_members:
            train_data.append(images)
            train_labels += labels
    with tarfile.open(path, "w:gz") as tar:
        for member, content in members.items():
            blob = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"{spec.folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, np.concatenate(train_data), np.array(train_labels)


def patch_md5(monkeypatch: pytest.MonkeyPatch, name: str, archive: Path) -> None:
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(data._OFFICIAL, name, dataclasses.replace(data._OFFICIAL[name], md5=md5))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_official_archive_parses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    archive, train_data, train_labels = fake_official_archive(
        tmp_path / data._OFFICIAL[name].filename, name
    )
    patch_md5(monkeypatch, name, archive)
    ds = load_dataset(name, tmp_path, download=False, progress=False)
    assert_well_formed(ds)
    assert ds.name == name
    assert len(ds.classes) == (10 if name == "cifar10" else 100) and ds.classes[1] == "class01"
    n_train = 4 * len(data._OFFICIAL[name].train_members)
    assert ds.train_images.shape == (n_train, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.train_labels.tolist() == train_labels.tolist()
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert ds.train_images[2, 1, 3, 5] == train_data[2, 1024 + 3 * 32 + 5]
    assert len(list(tmp_path.glob(f"{name}-*.npz"))) == 1  # cached next to the archive


def test_official_archive_with_wrong_checksum(tmp_path: Path) -> None:
    fake_official_archive(tmp_path / "cifar-10-python.tar.gz", "cifar10")
    with pytest.raises(ValueError, match="md5.*corrupt or not the official one"):
        load_dataset("cifar10", tmp_path, download=False, progress=False)


def test_missing_official_archive_offline(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar100", tmp_path, download=False, progress=False)
    message = str(err.value)
    assert str(tmp_path / "cifar-100-python.tar.gz") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz" in message
    assert "pass --dataset with the path of an image folder or archive" in message
    assert "shared" not in message and "../" not in message  # no path of this project's own


def test_a_missing_dataset_path_is_no_such_file(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.tar.gz", "nope.tar.gz", "data/cifar", "./x"):
        with pytest.raises(FileNotFoundError, match=f"{missing}: no such file or directory"):
            load_dataset(missing, tmp_path, progress=False)


def test_failed_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="could not download.*unreachable.*--dataset"):
        load_dataset("cifar10", tmp_path, progress=False)
    assert os.listdir(tmp_path) == []  # no partial download left behind


class FakeResponse(io.BytesIO):
    def __init__(self, payload: bytes) -> None:
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


def test_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive, _, train_labels = fake_official_archive(tmp_path / "fake.tar.gz", "cifar10")
    patch_md5(monkeypatch, "cifar10", archive)
    urls = []

    def urlopen(url: str, timeout: float) -> FakeResponse:
        urls.append(url)
        return FakeResponse(archive.read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    ds = load_dataset("cifar10", tmp_path / "dl", progress=False)
    assert urls == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert (tmp_path / "dl" / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert ds.train_labels.tolist() == train_labels.tolist()


def test_download_with_wrong_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: FakeResponse(b"x"))
    with pytest.raises(RuntimeError, match="md5 mismatch"):
        load_dataset("cifar10", tmp_path, progress=False)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# Names


def test_unknown_name_lists_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet", tmp_path)
    for name in DATASET_NAMES:
        assert name in str(err.value)
    assert "path" in str(err.value) and "archive" in str(err.value)
    assert "no such file" not in str(err.value)  # a name, not a path


def test_test_subset_is_stratified_and_the_same_for_every_seed(subset_cache: Path) -> None:
    a = load_dataset("cifar10-subset", subset_cache, test_subset=500, seed=0, progress=False)
    b = load_dataset("cifar10-subset", subset_cache, test_subset=500, seed=7, progress=False)
    assert a.test_images.shape[0] == 500 and torch.equal(a.test_images, b.test_images)
    assert torch.bincount(a.test_labels).tolist() == [50] * 10
    with pytest.raises(ValueError, match="test_subset=3000 exceeds the 2000 test images"):
        load_dataset("cifar10-subset", subset_cache, test_subset=3000, progress=False)


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="cannot read archive"):
        load_dataset(path, progress=False)


# ----------------------------------------------------------------------------------------------
# Real data: the full CIFAR-10 copy in ../shared/data where present (decodes 60,000 JPEGs)


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason=f"{SHARED_ARCHIVE} is absent")
def test_shared_cifar10_jpeg_archive(tmp_path: Path) -> None:
    ds = load_dataset(SHARED_ARCHIVE, tmp_path, progress=False)
    assert_well_formed(ds)
    assert ds.name == "cifar10-jpeg" and len(ds.classes) == 10
    assert ds.train_images.shape == (50_000, 3, 32, 32)
    assert ds.test_images.shape == (10_000, 3, 32, 32)
    assert ds.train_labels.bincount().tolist() == [5000] * 10
    assert ds.test_labels.bincount().tolist() == [1000] * 10
    assert ds.mean == pytest.approx((0.4913, 0.4821, 0.4465), abs=2e-4)
