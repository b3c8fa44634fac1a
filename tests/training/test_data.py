"""Tests for anodev2_jax.training.data: the source dispatch, synthetic data, normalisation,
augmentation, epoch order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from anodev2_jax.training import data

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
