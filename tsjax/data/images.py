"""Real image data sets in memory, and host-side batch iterators.

Everything a training run needs before the first jitted step:

* **Loaders** returning one in-memory representation, :class:`ImageDataset`:
  ``images`` uint8 ``[N, H, W, C]`` (NHWC), ``labels`` int32 ``[N]``, plus
  metadata (``num_classes``, per-channel ``mean`` / ``std`` in [0, 1] units for
  normalisation *inside* models, ``image_shape``).

  ==============  ==================================  ========================
  name            source                              ``data_dir`` means
  ==============  ==================================  ========================
  fashion_mnist   IDX files of the Debian package     folder holding the four
                  ``dataset-fashion-mnist``           ``*-idx?-ubyte[.gz]``
                                                      files (default
                                                      ``/usr/share/datasets/
                                                      fashion-mnist``)
  cifar10,        1. the pickled folders of the       folder holding (or
  cifar100        CIFAR site / torchvision            being) ``cifar-10-
                  (``cifar-10-batches-py/``,          batches-py`` / ``cifar-
                  ``cifar-100-python/``), read with   100-python``; when it
                  pickle + NumPy, if present;         has neither:
                  2. else ``tfds.data_source``        the TFDS data dir
                  (ArrayRecord, random access, no     (default: TFDS's own,
                  TensorFlow)                         ``$TFDS_DATA_DIR`` or
                                                      ``~/tensorflow_datasets``)
  tiny_imagenet   the standard ``tiny-imagenet-200``  folder holding (or being)
                  folder (TFDS has no builder)        ``tiny-imagenet-200``
  tfds:NAME       any TFDS image-classification data  the TFDS data dir (as
                  set prepared as ArrayRecord         above)
                  (``tfds:mnist``, ``tfds:svhn_
                  cropped``, ``tfds:NAME/CONFIG:
                  VERSION``); image and label keys,
                  image shape, ``num_classes`` and
                  mean / std (of its train split)
                  are read from the data
  ==============  ==================================  ========================

  :func:`check_name` validates the config field ``data.name`` before anything
  is loaded (a :class:`tsjax.config_checks.ConfigError` naming the field).

  Nothing here downloads anything. A missing data set raises an error that
  says how to get it and which config field (``data.data_dir``, i.e.
  ``--config.data.data_dir=DIR``) points elsewhere.

* :func:`split_validation`: a held-out validation split carved from train with
  a fixed seed (model selection never looks at the test set).

* :func:`train_batches`: shuffled epochs, global batch size ``B``, sharded over
  the devices; :func:`eval_batches`: fixed order, last batch padded, with a
  ``mask`` so every example is counted exactly once.

Batches are **uint8** on device (4x less host-to-device traffic than float32);
convert inside the jitted step with :func:`to_float` (``x / 255`` in [0, 1],
which is what :mod:`tsjax.data.augment` and the attacks expect) and, if the
model wants it, :func:`normalize` with the data set's ``mean`` / ``std``.

Multi-host (``jax.process_count() > 1``): every process loads the whole split
(host memory: CIFAR 150 MB, TinyImageNet 1.2 GB), draws the same global
permutation from the same seed, and materialises only the rows of each global
batch that its own devices hold (computed from the sharding, so the rows always
match the devices). The global ``jax.Array`` of shape ``[B, ...]`` is assembled
with ``jax.make_array_from_process_local_data``; ``B`` must be divisible by the
total device count. Single-process runs take the same code path.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import math
import os
import pickle
import re
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tsjax.config_checks import ConfigError, get_field

DATA_DIR_FIELD = "data.data_dir"
NAME_FIELD = "data.name"
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "apt-get install dataset-fashion-mnist"

# Built-in names; any TFDS image-classification data set is "tfds:NAME".
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "tiny_imagenet")
TFDS_PREFIX = "tfds:"
# TFDS's "name[/config][:version]" (version digits or "*", up to 3 parts).
_TFDS_NAME_RE = re.compile(
    r"[a-z][a-z0-9_]*(/[A-Za-z0-9_.+-]+)?(:(\d+|\*)(\.(\d+|\*)){0,2})?")

# Per-channel mean / std of the *training* split, pixel values in [0, 1]
# (population std over all pixels). Fashion-MNIST: computed here from the
# Debian package's train-images-idx3-ubyte.gz. CIFAR-10/100 and TinyImageNet:
# the widely published values (not recomputed in this repository; recompute
# with channel_stats(train.images) if exactness matters). The same train-split
# statistics are attached to every split (test / validation included).
_STATS = {
    "fashion_mnist": ((0.2860406,), (0.3530242,)),
    "cifar10": ((0.4913997, 0.4821584, 0.4465309),
                (0.2470322, 0.2434851, 0.2615878)),
    "cifar100": ((0.5070752, 0.4865489, 0.4409178),
                 (0.2673343, 0.2564385, 0.2761504)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}
_NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100,
                "tiny_imagenet": 200}


def is_tfds_name(name: Any) -> bool:
  """True for ``"tfds:NAME"`` data set names (any syntax after the prefix)."""
  return isinstance(name, str) and name.startswith(TFDS_PREFIX)


def _name_error(name: Any) -> str | None:
  """Why ``name`` is not a valid ``data.name`` value (None if it is)."""
  if is_tfds_name(name):
    tfds_name = name[len(TFDS_PREFIX):]
    if not _TFDS_NAME_RE.fullmatch(tfds_name):
      return (f"must be 'tfds:' followed by a TFDS data set name "
              f"(lowercase NAME, optionally /CONFIG and :VERSION, e.g. "
              f"'tfds:mnist', 'tfds:svhn_cropped', "
              f"'tfds:imagenette/160px:1.0.0'), got {name!r}")
    return None
  if name not in DATASETS:
    return (f"must be one of {list(DATASETS)} or 'tfds:NAME' for a TFDS "
            f"image-classification data set (e.g. 'tfds:mnist'), got "
            f"{name!r}")
  return None


def check_name(config: Any, field: str = NAME_FIELD) -> str:
  """Validates the data set name in ``config`` (default field ``data.name``).

  Accepted: one of :data:`DATASETS` or ``"tfds:NAME"`` (TFDS name syntax;
  whether TFDS knows NAME is checked when loading). Loads nothing and imports
  no TFDS, so experiments call it with the other config checks.

  Returns:
    the name.

  Raises:
    ConfigError: (a ValueError) naming the field, when it is missing or not
      an accepted name.
  """
  name = get_field(config, field)
  why = _name_error(name)
  if why is not None:
    raise ConfigError(f"config field '{field}' {why}")
  return name


def dataset_stats(name: str, data_dir: str | os.PathLike | None = None,
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """``(mean, std)`` per channel of a data set's train split, [0, 1] units.

  Built-in names (and ``tfds:`` + a built-in name) come from a table,
  without loading anything; other ``tfds:NAME`` data sets are computed from
  their train split in ``data_dir`` (loaded once per process, then cached).
  """
  tfds_name, base = _names(name)
  if base in _STATS:
    return _STATS[base]
  if is_tfds_name(name):
    return _tfds_train_stats(tfds_name, _dir_or_none(data_dir))
  raise ValueError(f"unknown data set {name!r}; expected one of "
                   f"{sorted(_STATS)} or 'tfds:NAME'")


def dataset_num_classes(name: str,
                        data_dir: str | os.PathLike | None = None) -> int:
  """Number of classes of a data set (``tfds:NAME``: from its TFDS metadata
  in ``data_dir``, which opens the data set but reads no images)."""
  tfds_name, base = _names(name)
  if base in _NUM_CLASSES:
    return _NUM_CLASSES[base]
  if is_tfds_name(name):
    source = _open_tfds(tfds_name, "train", _dir_or_none(data_dir))
    _, label_key = _feature_keys(source, tfds_name)
    return _num_classes(source, label_key, tfds_name)
  raise ValueError(f"unknown data set {name!r}; expected one of "
                   f"{sorted(_NUM_CLASSES)} or 'tfds:NAME'")


def _names(name: str) -> tuple[str, str]:
  """``(TFDS name, builder name)`` of a data set name; a malformed
  ``tfds:NAME`` is refused here (``ValueError``)."""
  if is_tfds_name(name):
    why = _name_error(name)
    if why is not None:
      raise ValueError(f"data set name {why}")
  tfds_name = name[len(TFDS_PREFIX):] if is_tfds_name(name) else name
  return tfds_name, _base_name(tfds_name)


def _base_name(tfds_name: str) -> str:
  """``"cifar10/config:3.0.2"`` -> ``"cifar10"`` (the builder's name)."""
  return tfds_name.split("/")[0].split(":")[0]


def _dir_or_none(data_dir: str | os.PathLike | None) -> str | None:
  return None if data_dir is None else os.path.expanduser(os.fspath(data_dir))


class DatasetNotPreparedError(FileNotFoundError):
  """The data set is not on disk where the config says; the message says how
  to prepare it (nothing is ever downloaded at run time)."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
  """An image classification split in host memory.

  Attributes:
    images: uint8 ``[N, H, W, C]``.
    labels: int32 ``[N]`` in ``[0, num_classes)``.
    num_classes: number of classes.
    mean, std: per-channel statistics of the training split, in [0, 1] units
      (length ``C``), for normalisation inside models.
    name, split: where the data came from.
  """
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str = ""
  split: str = ""

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4:
      raise ValueError(f"images must be uint8 [N, H, W, C], got "
                       f"{self.images.dtype} {self.images.shape}")
    if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(f"labels must be int32 [N={len(self.images)}], got "
                       f"{self.labels.dtype} {self.labels.shape}")
    c = self.images.shape[-1]
    if len(self.mean) != c or len(self.std) != c:
      raise ValueError(f"mean/std need {c} channels, got {self.mean}, {self.std}")

  def __len__(self) -> int:
    return int(self.images.shape[0])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)``."""
    return tuple(int(s) for s in self.images.shape[1:])

  def subset(self, indices, split: str | None = None) -> "ImageDataset":
    """The examples at ``indices`` (same metadata)."""
    idx = np.asarray(indices)
    return dataclasses.replace(self, images=self.images[idx],
                               labels=self.labels[idx],
                               split=self.split if split is None else split)


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) std of uint8 NHWC images, in [0, 1]."""
  x = np.asarray(images)
  c = x.shape[-1]
  flat = x.reshape(-1, c)
  n = flat.shape[0]
  s = np.zeros(c, np.float64)
  s2 = np.zeros(c, np.float64)
  for start in range(0, n, 1 << 22):  # chunks keep float64 copies small
    chunk = flat[start:start + (1 << 22)].astype(np.float64) / 255.0
    s += chunk.sum(0)
    s2 += (chunk * chunk).sum(0)
  mean = s / max(n, 1)
  std = np.sqrt(np.maximum(s2 / max(n, 1) - mean * mean, 0.0))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def to_float(images, dtype=jnp.float32):
  """uint8 images -> ``dtype`` in [0, 1] (cheapest inside the jitted step)."""
  return images.astype(dtype) / jnp.asarray(255, dtype)


def normalize(x, mean: Sequence[float], std: Sequence[float]):
  """``(x - mean) / std`` per channel (last axis), for x in [0, 1]."""
  dtype = x.dtype
  return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


# --------------------------------------------------------------------------
# IDX files (Fashion-MNIST / MNIST format)
# --------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8),
               0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class IDXFormatError(ValueError):
  """A file is not a well-formed IDX file (or not the one expected)."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Parses an IDX file (optionally gzip-compressed) into a numpy array.

  Format (big-endian): two zero bytes, a type code (0x08 uint8, 0x09 int8,
  0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
  dimensions ``d``, ``d`` uint32 sizes, then the data in C order. Gzip is
  detected from the content (magic bytes 1f 8b), not the file name.

  Raises:
    FileNotFoundError: no such file.
    IDXFormatError: bad magic number, unknown type code, truncated or
      over-long payload.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise IDXFormatError(f"{path}: corrupt gzip stream ({e})") from e
  if len(raw) < 4:
    raise IDXFormatError(f"{path}: {len(raw)} bytes, too short for an IDX "
                         f"header (4-byte magic number)")
  if raw[0] != 0 or raw[1] != 0:
    raise IDXFormatError(
        f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with "
        f"two zero bytes); is this an IDX file?")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES:
    raise IDXFormatError(f"{path}: unknown IDX type code 0x{code:02x} "
                         f"(magic 0x{raw[:4].hex()})")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise IDXFormatError(f"{path}: header truncated ({len(raw)} bytes, "
                         f"{ndim} dimensions need {header})")
  dims = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, 4))
  dtype = _IDX_DTYPES[code]
  expected = math.prod(dims) * dtype.itemsize
  got = len(raw) - header
  if got != expected:
    raise IDXFormatError(
        f"{path}: payload is {got} bytes but dimensions {dims} of "
        f"{dtype.name} need {expected} ({'truncated' if got < expected else 'trailing bytes'})")
  arr = np.frombuffer(raw, dtype, math.prod(dims), header).reshape(dims)
  return arr.astype(dtype.newbyteorder("="), copy=True)


def _fashion_file(data_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise DatasetNotPreparedError(
      f"Fashion-MNIST file {stem}.gz (or {stem}) not found in "
      f"{data_dir!r}. Install the Debian package with "
      f"`{FASHION_MNIST_APT}` (as root, after `apt-get update`; it puts "
      f"the files in {DEFAULT_FASHION_MNIST_DIR}/), or point the config "
      f"field '{DATA_DIR_FIELD}' (--config.{DATA_DIR_FIELD}=DIR) at a "
      f"directory holding train-images-idx3-ubyte.gz, "
      f"train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and "
      f"t10k-labels-idx1-ubyte.gz.")


def load_fashion_mnist(split: str = "train",
                       data_dir: str | os.PathLike | None = None) -> ImageDataset:
  """Fashion-MNIST from IDX files: ``[N, 28, 28, 1]`` uint8, labels 0..9.

  Args:
    split: ``"train"`` (60 000) or ``"test"`` (10 000).
    data_dir: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``
      (``.gz`` or not); ``None`` means ``/usr/share/datasets/fashion-mnist``
      (Debian package ``dataset-fashion-mnist``).
  """
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got "
                     f"{split!r} (carve validation with split_validation)")
  data_dir = os.fspath(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
  img_path = _fashion_file(data_dir, f"{prefix}-images-idx3-ubyte")
  lab_path = _fashion_file(data_dir, f"{prefix}-labels-idx1-ubyte")
  images = read_idx(img_path)
  labels = read_idx(lab_path)
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
    raise IDXFormatError(f"{img_path}: expected uint8 images [N, 28, 28] "
                         f"(magic 0x00000803), got {images.dtype} {images.shape}")
  if labels.dtype != np.uint8 or labels.ndim != 1:
    raise IDXFormatError(f"{lab_path}: expected uint8 labels [N] (magic "
                         f"0x00000801), got {labels.dtype} {labels.shape}")
  if labels.shape[0] != images.shape[0]:
    raise IDXFormatError(f"{img_path} has {images.shape[0]} images but "
                         f"{lab_path} has {labels.shape[0]} labels")
  if labels.size and labels.max() >= 10:
    raise IDXFormatError(f"{lab_path}: labels must be in 0..9, found "
                         f"{int(labels.max())}")
  mean, std = _STATS["fashion_mnist"]
  return ImageDataset(images[..., None], labels.astype(np.int32), 10, mean,
                      std, "fashion_mnist", split)


# --------------------------------------------------------------------------
# TFDS (CIFAR-10 / CIFAR-100) through tfds.data_source, no TensorFlow
# --------------------------------------------------------------------------

def _tfds_prepare_hint(name: str, data_dir: str | None) -> str:
  d = data_dir if data_dir is not None else "~/tensorflow_datasets"
  pickles = ""
  if name in _CIFAR_PICKLES:
    folder = _CIFAR_PICKLES[name]["folder"]
    pickles = (
        f"\nOr (no TFDS needed) put the pickled folder {folder}/ in the data "
        f"dir: download {_CIFAR_URL}{_CIFAR_PICKLES[name]['archive']} and "
        f"`tar xzf` it there (torchvision.datasets."
        f"{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}(root=DIR, "
        f"download=True) writes the same folder).")
  return (
      f"Prepare it once, on a machine with internet access and TensorFlow "
      f"installed, in the random-access ArrayRecord format:\n"
      f"    tfds build {name} --data_dir={d} --file_format=array_record\n"
      f"or in Python:\n"
      f"    tfds.builder({name!r}, data_dir={d!r}, "
      f"file_format='array_record').download_and_prepare()\n"
      f"then copy {d}/{name}/ here if needed, or point the config field "
      f"'{DATA_DIR_FIELD}' (--config.{DATA_DIR_FIELD}=DIR) at the TFDS data "
      f"dir that holds it. tsjax never downloads data at run time."
      + pickles)


def _open_tfds(name: str, split: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # heavy import, only when needed

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False, try_gcs=False)
  except Exception as e:  # noqa: BLE001 (re-raised below with a clear message)
    error = e
  where = data_dir if data_dir is not None else "the default TFDS data dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown TFDS data set {name!r} (tensorflow-datasets "
                     f"{tfds.__version__} has no such builder); check the "
                     f"config field '{NAME_FIELD}'") from e
  except Exception:  # noqa: BLE001
    builder = None
  if builder is None or not builder.is_prepared():
    location = str(builder.data_dir) if builder is not None else where
    raise DatasetNotPreparedError(
        f"TFDS data set {name!r} is not prepared in {where} (looked for "
        f"{location}). " + _tfds_prepare_hint(name, data_dir)) from error
  if isinstance(error, NotImplementedError):  # prepared, but not ArrayRecord
    raise DatasetNotPreparedError(
        f"TFDS data set {name!r} is prepared at {builder.data_dir} in a format "
        f"without random access ({error}). tfds.data_source needs ArrayRecord: "
        f"rebuild it. " + _tfds_prepare_hint(name, data_dir)) from error
  raise ValueError(f"TFDS data set {name!r} at {builder.data_dir}: cannot open "
                   f"split {split!r}: {error}") from error


def _feature_keys(source, name: str, image_key: str | None = None,
                  label_key: str | None = None) -> tuple[str, str]:
  """The image and label feature names of a TFDS source: the given ones, else
  ``"image"`` / ``"label"`` when the features have them, else the only
  image-like (3-d shape) / class-label (``num_classes``) feature."""
  try:
    features = dict(source.dataset_info.features.items())
  except Exception:  # noqa: BLE001 (no metadata: TFDS's usual names)
    features = {}
  if not features:
    return image_key or "image", label_key or "label"

  def pick(given, default, ok, what, arg):
    if given is not None:
      if given not in features:
        raise ValueError(f"TFDS {name!r} has no feature {given!r} (features: "
                         f"{sorted(features)})")
      return given
    if default in features:
      return default
    found = [k for k, f in features.items() if ok(f)]
    if len(found) != 1:
      raise ValueError(
          f"TFDS {name!r}: cannot tell which feature is the {what} (features: "
          f"{sorted(features)}); not an image-classification data set, or "
          f"pass {arg} to load_tfds")
    return found[0]

  shape = lambda f: tuple(getattr(f, "shape", ()) or ())
  return (pick(image_key, "image", lambda f: len(shape(f)) == 3, "image",
               "image_key"),
          pick(label_key, "label", lambda f: hasattr(f, "num_classes"),
               "class label", "label_key"))


def _num_classes(source, label_key: str, name: str,
                 labels: np.ndarray | None = None) -> int:
  """``num_classes`` of the label feature (else ``max(labels) + 1``)."""
  try:
    return int(source.dataset_info.features[label_key].num_classes)
  except Exception:  # noqa: BLE001
    if labels is None or not labels.size:
      raise ValueError(f"TFDS {name!r}: feature {label_key!r} has no "
                       f"num_classes (not a ClassLabel)") from None
    return int(labels.max()) + 1


def _read_into(source, n: int, image_key: str, label_key: str,
               chunk: int = 1024,
               name: str = "") -> tuple[np.ndarray, np.ndarray]:
  """All examples of a TFDS data source into preallocated arrays, reading in
  batches (``__getitems__``) where the source supports it. All images must
  have one shape and be uint8."""
  first = np.asarray(source[0][image_key])
  if first.dtype != np.uint8 or first.ndim not in (2, 3):
    raise ValueError(f"TFDS {name!r}: feature {image_key!r} holds "
                     f"{first.dtype} arrays of shape {first.shape}; expected "
                     f"uint8 images HxWxC (or HxW)")
  images = np.empty((n,) + first.shape, np.uint8)
  labels = np.empty((n,), np.int32)
  getitems = getattr(source, "__getitems__", None)
  for start in range(0, n, chunk):
    keys = list(range(start, min(n, start + chunk)))
    examples = None
    if getitems is not None:
      try:
        examples = getitems(keys)
      except TypeError:  # e.g. tfds.testing.mock_data's sources
        getitems = None
    if examples is None:
      examples = [source[k] for k in keys]
    for k, ex in zip(keys, examples):
      image = np.asarray(ex[image_key])
      if image.shape != first.shape:
        raise ValueError(
            f"TFDS {name!r}: images have different shapes ({first.shape} for "
            f"example 0, {image.shape} for example {k}); tsjax keeps a data "
            f"set as one [N, H, W, C] array, so prepare a fixed-size variant "
            f"(e.g. a TFDS config with resized images)")
      images[k] = image
      labels[k] = int(ex[label_key])
  return images, labels


# (TFDS name, data dir) -> train-split (mean, std), for data sets not in _STATS.
_TRAIN_STATS: dict[tuple[str, str | None], tuple[tuple[float, ...],
                                                 tuple[float, ...]]] = {}


def _tfds_train_stats(name: str, data_dir: str | None,
                      images: np.ndarray | None = None,
                      image_key: str | None = None,
                      label_key: str | None = None):
  """Per-channel (mean, std) of TFDS ``name``'s ``train`` split (``images``
  when given: they are that split), cached per process."""
  key = (name, data_dir)
  if key not in _TRAIN_STATS:
    if images is None:
      source = _open_tfds(name, "train", data_dir)
      image_key, label_key = _feature_keys(source, name, image_key, label_key)
      images, _ = _read_into(source, len(source), image_key, label_key,
                             name=name)
      if images.ndim == 3:
        images = images[..., None]
    _TRAIN_STATS[key] = channel_stats(images)
  return _TRAIN_STATS[key]


def load_tfds(name: str, split: str = "train",
              data_dir: str | os.PathLike | None = None, *,
              image_key: str | None = None,
              label_key: str | None = None) -> ImageDataset:
  """A TFDS image classification split via ``tfds.data_source`` (no TensorFlow).

  Args:
    name: TFDS name (``"cifar10"``, ``"cifar100"``, or any builder with an
      image and a ``ClassLabel`` feature; ``NAME/CONFIG:VERSION`` works).
    split: TFDS split string (``"train"``, ``"test"``, ``"train[:90%]"``...).
    data_dir: the TFDS data dir (``None``: TFDS's default).
    image_key, label_key: feature names; default ``"image"`` / ``"label"``
      when present, else the only image (3-d) / ``ClassLabel`` feature.

  Images (uint8, one shape for the whole split; ``HxW`` becomes ``HxWx1``),
  ``num_classes`` (the ``ClassLabel``'s) and, for data sets other than
  CIFAR-10/100 / Fashion-MNIST / TinyImageNet, the per-channel mean / std are
  read from the data: those of the **train** split, attached to every split
  (computed once per process; loading another split first reads train too).
  Never downloads: ``download=False, try_gcs=False``; when the data set is not
  prepared there, :class:`DatasetNotPreparedError` says how to prepare it.
  Works with ``tfds.testing.mock_data``.
  """
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  source = _open_tfds(name, split, data_dir)
  n = len(source)
  if n == 0:
    raise ValueError(f"TFDS {name!r} split {split!r} is empty")
  image_key, label_key = _feature_keys(source, name, image_key, label_key)
  images, labels = _read_into(source, n, image_key, label_key, name=name)
  if images.ndim == 3:
    images = images[..., None]
  base = _base_name(name)
  num_classes = _NUM_CLASSES.get(base)
  if num_classes is None:
    num_classes = _num_classes(source, label_key, name, labels)
  if base in _STATS:
    mean, std = _STATS[base]
  else:  # statistics of the train split, as for the built-in data sets
    mean, std = _tfds_train_stats(name, data_dir,
                                  images if split == "train" else None,
                                  image_key, label_key)
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"TFDS {name!r} labels outside [0, {num_classes})")
  return ImageDataset(images, labels, num_classes, tuple(mean), tuple(std),
                      base, split)


# --------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 from the pickled folders (CIFAR site, torchvision)
# --------------------------------------------------------------------------

_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_CIFAR_PICKLES = {
    "cifar10": {"folder": "cifar-10-batches-py",
                "archive": "cifar-10-python.tar.gz",
                "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test": ("test_batch",), "meta": "batches.meta",
                "labels": "labels"},
    "cifar100": {"folder": "cifar-100-python",
                 "archive": "cifar-100-python.tar.gz",
                 "train": ("train",), "test": ("test",), "meta": "meta",
                 "labels": "fine_labels"},
}
# The only globals a CIFAR pickle (Python 2 era, NumPy arrays) refers to.
_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # Python 3 protocol-2 bytes
}


class _CifarUnpickler(pickle.Unpickler):
  """Unpickles only plain containers and NumPy arrays: a CIFAR file that
  names any other global (which could run code) is refused."""

  def find_class(self, module, name):
    obj = _PICKLE_GLOBALS.get((module, name))
    if obj is None:
      raise pickle.UnpicklingError(
          f"refusing to load the global {module}.{name}: CIFAR pickles hold "
          f"only dicts, lists, bytes and NumPy arrays")
    return obj


def _read_cifar_pickle(path: str) -> dict:
  """One CIFAR pickle file (``encoding="bytes"``) as a dict with str keys."""
  try:
    with open(path, "rb") as f:
      obj = _CifarUnpickler(f, encoding="bytes").load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, IndexError) as e:
    raise ValueError(f"{path}: not a readable CIFAR pickle ({e}); re-extract "
                     f"the archive") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a pickled dict, got "
                     f"{type(obj).__name__}")
  return {k.decode("latin1") if isinstance(k, bytes) else k: v
          for k, v in obj.items()}


def find_cifar_folder(name: str,
                      data_dir: str | os.PathLike | None) -> str | None:
  """The pickled CIFAR folder for ``name`` (``"cifar10"`` / ``"cifar100"``)
  that ``data_dir`` holds (``DIR/cifar-10-batches-py``) or is (its name is
  the folder's, or it contains the metadata file and a data file); else None.
  """
  if data_dir is None or name not in _CIFAR_PICKLES:
    return None
  spec = _CIFAR_PICKLES[name]
  data_dir = os.fspath(data_dir)
  inside = os.path.join(data_dir, spec["folder"])
  if os.path.isdir(inside):
    return inside
  files = spec["train"] + spec["test"]
  if os.path.isdir(data_dir) and (
      os.path.basename(os.path.normpath(data_dir)) == spec["folder"]
      or (os.path.isfile(os.path.join(data_dir, spec["meta"]))
          and any(os.path.isfile(os.path.join(data_dir, f)) for f in files))):
    return data_dir
  return None


def load_cifar_pickle(name: str, split: str = "train",
                      folder: str | os.PathLike = ".") -> ImageDataset:
  """CIFAR-10/100 from the pickled folder of the CIFAR site / torchvision.

  Layouts (as extracted from ``cifar-10-python.tar.gz`` /
  ``cifar-100-python.tar.gz``; ``torchvision.datasets.CIFAR10/100`` download
  the same)::

      cifar-10-batches-py/   data_batch_1 ... data_batch_5 (10 000 each),
                             test_batch (10 000), batches.meta
      cifar-100-python/      train (50 000), test (10 000), meta

  Each file is a pickled dict (read with ``encoding="bytes"``, only NumPy
  arrays and plain containers allowed) with ``b"data"``: uint8 ``[N, 3072]``
  (1024 red, 1024 green, 1024 blue values, rows of 32) and ``b"labels"``
  (CIFAR-10) / ``b"fine_labels"`` (CIFAR-100, 100 classes; the 20 coarse
  labels are not used). No TFDS, no torch.

  Args:
    name: ``"cifar10"`` or ``"cifar100"``.
    split: ``"train"`` or ``"test"`` (carve validation with
      :func:`split_validation`).
    folder: the ``cifar-10-batches-py`` / ``cifar-100-python`` folder, or a
      folder holding it.

  Returns:
    uint8 ``[N, 32, 32, 3]`` images, int32 labels, the same metadata
    (classes, mean / std) as the TFDS path.

  Raises:
    DatasetNotPreparedError: a file of the split is missing (the message
      names it, how to get it and the config field ``data.data_dir``).
    ValueError: a file is not a CIFAR pickle of the expected shape.
  """
  if name not in _CIFAR_PICKLES:
    raise ValueError(f"pickled CIFAR name must be one of "
                     f"{sorted(_CIFAR_PICKLES)}, got {name!r}")
  spec = _CIFAR_PICKLES[name]
  if split not in ("train", "test"):
    raise ValueError(f"{name} split must be 'train' or 'test' with the "
                     f"pickled folder, got {split!r} (carve validation with "
                     f"split_validation)")
  root = find_cifar_folder(name, folder) or os.fspath(folder)
  num_classes = _NUM_CLASSES[name]
  images, labels = [], []
  for file in spec[split]:
    path = os.path.join(root, file)
    if not os.path.isfile(path):
      raise DatasetNotPreparedError(
          f"{name} pickle file {file!r} not found in {root!r}: the folder "
          f"{spec['folder']}/ must hold "
          f"{', '.join(spec['train'] + spec['test'])} and {spec['meta']}. "
          f"Download {_CIFAR_URL}{spec['archive']} and "
          f"`tar xzf` it in a directory DIR (or let torchvision."
          f"{'CIFAR10' if name == 'cifar10' else 'CIFAR100'}(root=DIR, "
          f"download=True) do it), then point the config field "
          f"'{DATA_DIR_FIELD}' (--config.{DATA_DIR_FIELD}=DIR) at DIR.")
    batch = _read_cifar_pickle(path)
    data, lab = batch.get("data"), batch.get(spec["labels"])
    if not isinstance(data, np.ndarray) or lab is None:
      raise ValueError(f"{path}: expected keys b'data' (array) and "
                       f"b'{spec['labels']}', found {sorted(batch)}")
    lab = np.asarray(lab)
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072
        or lab.shape != data.shape[:1]):
      raise ValueError(f"{path}: expected uint8 data [N, 3072] and N labels, "
                       f"got data {data.dtype} {data.shape}, labels "
                       f"{lab.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
      raise ValueError(f"{path}: labels must be in 0..{num_classes - 1}, "
                       f"found {int(lab.min())}..{int(lab.max())}")
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels.append(lab.astype(np.int32))
  mean, std = _STATS[name]
  return ImageDataset(np.ascontiguousarray(np.concatenate(images)),
                      np.concatenate(labels), num_classes, mean, std, name,
                      split)


# --------------------------------------------------------------------------
# TinyImageNet (tiny-imagenet-200 folder; TFDS 4.9 has no builder)
# --------------------------------------------------------------------------

def _tiny_root(data_dir: str) -> str:
  for cand in (os.path.join(data_dir, "tiny-imagenet-200"), data_dir):
    if os.path.isfile(os.path.join(cand, "wnids.txt")):
      return cand
  raise DatasetNotPreparedError(
      f"TinyImageNet not found: no tiny-imagenet-200/wnids.txt under "
      f"{data_dir!r}. TFDS has no TinyImageNet builder; download "
      f"http://cs231n.stanford.edu/tiny-imagenet-200.zip on a machine with "
      f"internet access, unzip it so that DIR/tiny-imagenet-200/ exists "
      f"(wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
      f"val/val_annotations.txt) and point the config field "
      f"'{DATA_DIR_FIELD}' (--config.{DATA_DIR_FIELD}=DIR) at DIR.")


def _read_images(paths: Sequence[str], size: int = 64) -> np.ndarray:
  from PIL import Image  # pillow is a tensorflow-datasets dependency

  out = np.empty((len(paths), size, size, 3), np.uint8)
  for i, p in enumerate(paths):
    with Image.open(p) as im:
      im = im.convert("RGB")  # a few TinyImageNet images are greyscale
      if im.size != (size, size):
        raise ValueError(f"{p}: expected {size}x{size}, got {im.size}")
      out[i] = np.asarray(im, np.uint8)
  return out


def load_tiny_imagenet(split: str = "train",
                       data_dir: str | os.PathLike = ".") -> ImageDataset:
  """TinyImageNet from the standard ``tiny-imagenet-200`` folder, read with PIL.

  Layout (as unzipped from ``tiny-imagenet-200.zip``)::

      DIR/tiny-imagenet-200/         (``data_dir`` may be DIR or this folder)
        wnids.txt                    200 WordNet ids, one per line
        train/<wnid>/images/*.JPEG   500 64x64 images per class
        val/images/*.JPEG            10 000 images
        val/val_annotations.txt      "<file>\\t<wnid>\\t<bbox...>" per line

  A ``val`` folder already reorganised ImageFolder-style
  (``val/<wnid>/[images/]*.JPEG``) is accepted too. The labelled ``test``
  folder does not exist (its labels were never released), so ``split="test"``
  and ``"validation"`` both mean the 10 000 validation images, as in the
  adversarial-distillation papers. Class index = position of the wnid in
  *sorted* order (torchvision ``ImageFolder``'s convention). Images are
  ``[N, 64, 64, 3]`` uint8; greyscale files are converted to RGB. Decoding
  110k JPEGs takes a minute or so; cache the arrays yourself if needed.
  """
  if split not in ("train", "validation", "val", "test"):
    raise ValueError(f"TinyImageNet split must be 'train' or "
                     f"'validation'/'test', got {split!r}")
  root = _tiny_root(os.fspath(data_dir))
  with open(os.path.join(root, "wnids.txt")) as f:
    wnids = sorted({line.strip() for line in f if line.strip()})
  index = {w: i for i, w in enumerate(wnids)}
  paths, labels = [], []
  is_img = lambda n: n.lower().endswith((".jpeg", ".jpg", ".png"))
  if split == "train":
    for w in wnids:
      d = os.path.join(root, "train", w, "images")
      if not os.path.isdir(d):
        d = os.path.join(root, "train", w)
      if not os.path.isdir(d):
        raise DatasetNotPreparedError(f"TinyImageNet: missing folder {d}")
      names = sorted(n for n in os.listdir(d) if is_img(n))
      paths += [os.path.join(d, n) for n in names]
      labels += [index[w]] * len(names)
  else:
    val = os.path.join(root, "val")
    ann = os.path.join(val, "val_annotations.txt")
    if os.path.isfile(ann):
      with open(ann) as f:
        rows = [line.split("\t") for line in f if line.strip()]
      for row in sorted(rows):
        if row[1] not in index:
          raise ValueError(f"{ann}: unknown wnid {row[1]!r}")
        paths.append(os.path.join(val, "images", row[0]))
        labels.append(index[row[1]])
    else:
      for w in wnids:
        d = os.path.join(val, w, "images")
        if not os.path.isdir(d):
          d = os.path.join(val, w)
        if not os.path.isdir(d):
          raise DatasetNotPreparedError(
              f"TinyImageNet: neither {ann} nor the folder {d} exists")
        names = sorted(n for n in os.listdir(d) if is_img(n))
        paths += [os.path.join(d, n) for n in names]
        labels += [index[w]] * len(names)
  if not paths:
    raise DatasetNotPreparedError(f"TinyImageNet: no images for split {split!r} in {root}")
  images = _read_images(paths)
  mean, std = _STATS["tiny_imagenet"]
  return ImageDataset(images, np.asarray(labels, np.int32), len(wnids), mean,
                      std, "tiny_imagenet", "train" if split == "train" else "validation")


# --------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------

def load_dataset(name: str, split: str = "train",
                 data_dir: str | os.PathLike | None = None) -> ImageDataset:
  """Loads ``name`` (one of :data:`DATASETS`, or ``"tfds:NAME"``) split
  ``split`` from ``data_dir``.

  ``data_dir=None`` uses each source's default (see the module docstring);
  TinyImageNet needs one. A leading ``~`` is expanded. CIFAR-10/100 come from
  the pickled folder when ``data_dir`` holds (or is) one, else from TFDS;
  ``"tfds:cifar10"`` always means TFDS.
  """
  data_dir = _dir_or_none(data_dir)
  if is_tfds_name(name):
    why = _name_error(name)
    if why is not None:
      raise ValueError(f"data set name {why}")
    return load_tfds(name[len(TFDS_PREFIX):], split, data_dir)
  if name == "fashion_mnist":
    return load_fashion_mnist(split, data_dir)
  if name in ("cifar10", "cifar100"):
    folder = find_cifar_folder(name, data_dir)
    if folder is not None:
      return load_cifar_pickle(name, split, folder)
    return load_tfds(name, split, data_dir)
  if name == "tiny_imagenet":
    if data_dir is None:
      raise DatasetNotPreparedError(
          f"TinyImageNet needs a data dir: set the config field "
          f"'{DATA_DIR_FIELD}' (--config.{DATA_DIR_FIELD}=DIR) to the folder "
          f"holding tiny-imagenet-200/")
    return load_tiny_imagenet(split, data_dir)
  raise ValueError(f"unknown data set {name!r}; expected one of "
                   f"{list(DATASETS)} or 'tfds:NAME'")


def load_from_config(config: Any, split: str = "train") -> ImageDataset:
  """:func:`load_dataset` with ``config.data.name`` (checked by
  :func:`check_name`) and ``config.data.data_dir`` (optional: missing or
  ``None`` means the source's default)."""
  name = check_name(config)
  data = config["data"] if isinstance(config, Mapping) else config.data
  get = (lambda k, d=None: data.get(k, d)) if hasattr(data, "get") else (
      lambda k, d=None: getattr(data, k, d))
  return load_dataset(name, split, get("data_dir"))


# --------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------

def split_validation(images: np.ndarray, labels: np.ndarray, num_val: int,
                     seed: int, *, stratify: bool = False):
  """Carves ``num_val`` examples out of a training set, deterministically.

  The validation indices are a function of ``(len(labels), num_val, seed,
  stratify)`` (and the labels, when stratified) only; train and validation are
  disjoint and together cover every example; both keep the original order.
  With ``stratify=True`` every class gets ``num_val * n_c / N`` validation
  examples (largest remainders rounded up, so the total is exactly
  ``num_val``).

  Returns:
    ``((train_images, train_labels), (val_images, val_labels))``.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  if len(images) != n:
    raise ValueError(f"{len(images)} images but {n} labels")
  if not 0 <= num_val <= n:
    raise ValueError(f"num_val must be in [0, {n}], got {num_val}")
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7A11D]))
  if not stratify:
    val_idx = rng.permutation(n)[:num_val]
  else:
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (num_val / n)
    take = np.floor(quota).astype(np.int64)
    rest = num_val - int(take.sum())
    order = np.lexsort((classes, -(quota - take)))  # largest remainder first
    take[order[:rest]] += 1
    val_idx = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:k]
        for c, k in zip(classes, take)] + [np.zeros(0, np.int64)])
  mask = np.zeros(n, bool)
  mask[val_idx] = True
  tr, va = np.flatnonzero(~mask), np.flatnonzero(mask)
  return (images[tr], labels[tr]), (images[va], labels[va])


def split_dataset(ds: ImageDataset, num_val: int, seed: int, *,
                  stratify: bool = False) -> tuple[ImageDataset, ImageDataset]:
  """:func:`split_validation` on an :class:`ImageDataset` -> (train, val)."""
  (xt, yt), (xv, yv) = split_validation(ds.images, ds.labels, num_val, seed,
                                        stratify=stratify)
  return (dataclasses.replace(ds, images=xt, labels=yt, split="train_minus_val"),
          dataclasses.replace(ds, images=xv, labels=yv, split="validation"))


# --------------------------------------------------------------------------
# Batch iterators
# --------------------------------------------------------------------------

def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices
  of all processes)."""
  devs = np.asarray(jax.devices() if devices is None else list(devices))
  return Mesh(devs.reshape(-1), ("data",))


def batch_sharding(mesh: Mesh | None = None) -> NamedSharding:
  """Leading (batch) axis split over the mesh axis ``"data"``."""
  return NamedSharding(mesh if mesh is not None else data_mesh(),
                       PartitionSpec("data"))


def _check_batch(batch_size: int, mesh: Mesh | None) -> None:
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(
        f"global batch_size {batch_size} must be divisible by the number of "
        f"devices it is sharded over ({mesh.size}); use a multiple of "
        f"{mesh.size}, e.g. {max(mesh.size, batch_size // mesh.size * mesh.size)}")


def process_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """Rows ``[start, stop)`` of a global batch held by this process's devices.

  Single-process: ``(0, global_batch)``. Raises when the rows of this process
  are not contiguous (a mesh whose devices interleave processes).
  """
  idx = sharding.addressable_devices_indices_map((global_batch,))
  spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                  for s in idx.values()})
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start != stop:
      raise ValueError(f"this process's rows of the batch are not contiguous "
                       f"({spans}); order the mesh devices by process")
  return spans[0][0], spans[-1][1]


def _put(arrays: Mapping[str, np.ndarray], sharding: NamedSharding | None,
         global_batch: int):
  if sharding is None:
    return dict(arrays)
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (global_batch,) + v.shape[1:]) for k, v in arrays.items()}


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
  """The order of epoch ``epoch``: a permutation of ``range(n)`` from a numpy
  Generator seeded with ``(seed, epoch)`` (same on every process)."""
  return np.random.default_rng(
      np.random.SeedSequence([int(seed), int(epoch)])).permutation(n)


def train_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                  seed: int, num_epochs: int | None = None, start_step: int = 0,
                  mesh: Mesh | None = None, shard: bool = True,
                  ) -> Iterator[dict[str, Any]]:
  """Shuffled training batches of global size ``batch_size``.

  The examples form one stream: epoch 0's permutation, then epoch 1's, ...
  (:func:`epoch_permutation`); batch ``s`` is stream positions
  ``[s*B, (s+1)*B)``. So every epoch visits every example exactly once (a batch
  may straddle two epochs when ``B`` does not divide ``N``), and batch ``s``
  depends only on ``(seed, s)``: pass ``start_step`` to resume a killed run on
  exactly the batches it would have seen.

  Args:
    images: uint8 ``[N, H, W, C]``; labels: int ``[N]``.
    batch_size: the global batch ``B`` (all devices of all processes).
    seed: e.g. ``config.seed``; num_epochs: ``None`` = forever, else stops
      after ``floor(num_epochs * N / B)`` batches (the final < B examples of
      the last epoch are dropped, only then).
    start_step: first batch index to produce.
    mesh: 1-D mesh with axis ``"data"`` (default :func:`data_mesh`).
    shard: ``False`` yields host numpy arrays (no device transfer, no
      divisibility requirement).

  Yields:
    ``{"image": uint8 [B, H, W, C], "label": int32 [B]}``, global
    ``jax.Array``s sharded over ``mesh`` along the batch axis (each process
    supplies only its own rows), or numpy arrays when ``shard=False``.

  Raises:
    ValueError: ``B`` not divisible by the number of devices.
  """
  labels = np.asarray(labels, np.int32)
  n = len(labels)
  if len(images) != n or n == 0:
    raise ValueError(f"need as many images as labels (> 0), got {len(images)}, {n}")
  if shard and mesh is None:
    mesh = data_mesh()
  _check_batch(batch_size, mesh if shard else None)
  sharding = batch_sharding(mesh) if shard else None
  lo, hi = process_rows(sharding, batch_size) if shard else (0, batch_size)
  total = None if num_epochs is None else (int(num_epochs) * n) // batch_size
  cache: dict[int, np.ndarray] = {}

  def perm(epoch):
    if epoch not in cache:
      if len(cache) > 2:
        cache.clear()
      cache[epoch] = epoch_permutation(n, seed, epoch)
    return cache[epoch]

  step = int(start_step)
  while total is None or step < total:
    pos = np.arange(step * batch_size + lo, step * batch_size + hi)
    ep = pos // n
    idx = np.empty(len(pos), np.int64)
    for e in np.unique(ep):
      sel = ep == e
      idx[sel] = perm(int(e))[pos[sel] % n]
    yield _put({"image": images[idx], "label": labels[idx]}, sharding, batch_size)
    step += 1


def num_eval_batches(n: int, batch_size: int) -> int:
  """``ceil(n / batch_size)``: every example, the last batch padded."""
  return -(-int(n) // int(batch_size))


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 mesh: Mesh | None = None, shard: bool = True,
                 ) -> Iterator[dict[str, Any]]:
  """All examples in order, in ``ceil(N / B)`` batches of the same shape.

  The last batch is padded with zero images and label 0; ``mask`` is True on
  real examples, so ``sum(metric * mask)`` over all batches counts each
  example exactly once (never drops the remainder). Sharding as in
  :func:`train_batches`.

  Yields:
    ``{"image": uint8 [B, H, W, C], "label": int32 [B], "mask": bool [B]}``.
  """
  labels = np.asarray(labels, np.int32)
  n = len(labels)
  if len(images) != n:
    raise ValueError(f"{len(images)} images but {n} labels")
  if shard and mesh is None:
    mesh = data_mesh()
  _check_batch(batch_size, mesh if shard else None)
  sharding = batch_sharding(mesh) if shard else None
  lo, hi = process_rows(sharding, batch_size) if shard else (0, batch_size)
  for b in range(num_eval_batches(n, batch_size)):
    start, stop = b * batch_size + lo, b * batch_size + hi
    real = np.arange(start, stop) < n
    idx = np.where(real, np.arange(start, stop), 0)
    x = images[idx]
    x[~real] = 0
    y = np.where(real, labels[idx], 0).astype(np.int32)
    yield _put({"image": x, "label": y, "mask": real}, sharding, batch_size)
