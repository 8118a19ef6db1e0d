"""tsjax.data.images: IDX parsing, Fashion-MNIST, pickled CIFAR folders, TFDS
(mock and a real ArrayRecord build, ``tfds:NAME``), TinyImageNet folders, the
``data.name`` check, validation split, batch iterators.

No test touches the network: the TFDS tests block sockets.
"""

import functools
import gzip
import io
import os
import pickle
import socket

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tsjax.config_checks import ConfigError
from tsjax.data import images as I
from tsjax.train import teachers

FMNIST = I.DEFAULT_FASHION_MNIST_DIR


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise OSError("network access attempted in a test")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def write_idx(path, arr, code=0x08, gz=False, extra=b""):
  arr = np.asarray(arr)
  dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
        0x0E: ">f8"}[code]
  raw = (bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
         + arr.astype(dt).tobytes() + extra)
  with open(path, "wb") as f:
    f.write(gzip.compress(raw) if gz else raw)
  return path


# ----------------------------------------------------------------- IDX / FMNIST

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
  imgs = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
  out = I.read_idx(write_idx(tmp_path / "a.idx", imgs, gz=gz))
  assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
  np.testing.assert_array_equal(out, imgs)
  ints = np.array([-7, 0, 123456], np.int32)
  out = I.read_idx(write_idx(tmp_path / "b.idx", ints, code=0x0C, gz=gz))
  assert out.dtype == np.int32 and out.dtype.isnative
  np.testing.assert_array_equal(out, ints)


def test_read_idx_errors(tmp_path):
  p = tmp_path / "bad"
  p.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x02ab")
  with pytest.raises(I.IDXFormatError, match="magic"):
    I.read_idx(p)
  p.write_bytes(b"\x00\x00\x42\x01\x00\x00\x00\x02ab")
  with pytest.raises(I.IDXFormatError, match="type code"):
    I.read_idx(p)
  raw = bytes([0, 0, 8, 2]) + np.asarray([2, 3], ">u4").tobytes() + b"\x00" * 5
  p.write_bytes(raw)
  with pytest.raises(I.IDXFormatError, match="truncated"):
    I.read_idx(p)
  write_idx(p, np.zeros((2, 3), np.uint8), extra=b"\x00")
  with pytest.raises(I.IDXFormatError, match="trailing"):
    I.read_idx(p)
  p.write_bytes(b"\x00\x00")
  with pytest.raises(I.IDXFormatError, match="too short"):
    I.read_idx(p)


def _fake_fmnist(d, n_train=12, n_test=5, labels=None):
  rng = np.random.default_rng(0)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    write_idx(d / f"{prefix}-images-idx3-ubyte.gz",
              rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz=True)
    lab = np.arange(n) % 10 if labels is None else labels
    write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", lab, gz=True)


def test_fashion_mnist_tiny_files(tmp_path):
  _fake_fmnist(tmp_path)
  ds = I.load_fashion_mnist("train", tmp_path)
  assert ds.images.shape == (12, 28, 28, 1) and ds.images.dtype == np.uint8
  assert ds.labels.dtype == np.int32 and ds.num_classes == 10
  assert ds.image_shape == (28, 28, 1) and len(ds.mean) == 1
  assert len(I.load_fashion_mnist("test", tmp_path)) == 5
  with pytest.raises(ValueError, match="split"):
    I.load_fashion_mnist("validation", tmp_path)


def test_fashion_mnist_bad_files(tmp_path):
  _fake_fmnist(tmp_path, labels=np.full(12, 10))
  with pytest.raises(I.IDXFormatError, match="0..9"):
    I.load_fashion_mnist("train", tmp_path)
  write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11), gz=True)
  with pytest.raises(I.IDXFormatError, match="12 images but"):
    I.load_fashion_mnist("train", tmp_path)
  # Images and labels swapped: caught by the shape / magic check.
  os.replace(tmp_path / "t10k-labels-idx1-ubyte.gz", tmp_path / "x")
  os.replace(tmp_path / "t10k-images-idx3-ubyte.gz",
             tmp_path / "t10k-labels-idx1-ubyte.gz")
  os.replace(tmp_path / "x", tmp_path / "t10k-images-idx3-ubyte.gz")
  with pytest.raises(I.IDXFormatError, match="0x00000803"):
    I.load_fashion_mnist("test", tmp_path)


def test_fashion_mnist_missing_path_error(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    I.load_fashion_mnist("train", tmp_path / "nowhere")
  msg = str(err.value)
  assert "apt-get install dataset-fashion-mnist" in msg
  assert "data.data_dir" in msg and "train-images-idx3-ubyte" in msg


@pytest.mark.skipif(not os.path.isdir(FMNIST),
                    reason=f"{FMNIST} missing: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_real_files():
  train = I.load_dataset("fashion_mnist", "train")
  test = I.load_dataset("fashion_mnist", "test")
  assert train.images.shape == (60000, 28, 28, 1)
  assert test.images.shape == (10000, 28, 28, 1)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))
  np.testing.assert_array_equal(train.labels[:5], [9, 0, 0, 3, 0])
  assert 0 < train.images.mean() < 255
  mean, std = I.channel_stats(train.images)
  np.testing.assert_allclose(mean, train.mean, atol=1e-6)
  np.testing.assert_allclose(std, train.std, atol=1e-6)


# ----------------------------------------------------------------------- TFDS

def test_tfds_mock_cifar(tmp_path, no_network):
  tfds = pytest.importorskip("tensorflow_datasets")
  # mock_data replaces the reading itself, so any data_dir "works" inside it.
  with tfds.testing.mock_data(num_examples=13):
    ds = I.load_dataset("cifar10", "train", tmp_path)
    ds100 = I.load_tfds("cifar100", "test", tmp_path)
  assert ds.images.shape == (13, 32, 32, 3) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (13,) and ds.labels.dtype == np.int32
  assert ds.labels.min() >= 0 and ds.labels.max() < 10
  assert ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
  assert len(ds.mean) == 3 and len(ds.std) == 3 and ds.split == "train"
  assert ds100.num_classes == 100 and ds100.labels.max() < 100
  assert ds100.images.shape == (13, 32, 32, 3)


def test_tfds_not_prepared_error(tmp_path, no_network):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(I.DatasetNotPreparedError) as err:
    I.load_dataset("cifar10", "train", tmp_path)
  msg = str(err.value)
  assert "tfds build cifar10" in msg and str(tmp_path) in msg
  assert "download_and_prepare" in msg and "data.data_dir" in msg
  assert isinstance(err.value, FileNotFoundError)
  assert os.listdir(tmp_path) == []  # nothing downloaded or written
  # CIFAR's message also offers the pickled folder.
  assert "cifar-10-batches-py/" in msg and "cifar-10-python.tar.gz" in msg
  with pytest.raises(ValueError, match="unknown TFDS data set"):
    I.load_tfds("no_such_dataset_xyz", "train", tmp_path)


_TEST_IMAGES = {
    "train": np.random.default_rng(3).integers(0, 256, (21, 8, 8, 3), dtype=np.uint8),
    "test": np.random.default_rng(4).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)}


@functools.lru_cache(maxsize=None)
def _test_builder_class():
  """A tiny TFDS builder, defined (and so registered) once per process."""
  import tensorflow_datasets as tfds
  data = _TEST_IMAGES

  class TsjaxTestImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(8, 8, 3)),
          "label": tfds.features.ClassLabel(num_classes=4)}))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(s) for s in data}

    def _generate_examples(self, split):
      for i, img in enumerate(data[split]):
        yield i, {"image": img, "label": i % 4}

  return TsjaxTestImages


def test_tfds_real_array_record_build(tmp_path, no_network, monkeypatch):
  """A real TFDS build (ArrayRecord, PNG-encoded images) read back through
  tfds.data_source: the path real CIFAR takes, without the mock."""
  pytest.importorskip("tensorflow_datasets")
  from PIL import Image
  try:
    from tensorflow_datasets.core.features import image_feature
    encoder = image_feature._ImageEncoder
    encoder._encode_image  # noqa: B018
  except (ImportError, AttributeError):
    pytest.skip("TFDS internals changed; cannot build without TensorFlow")

  def encode_png(self, img):  # TFDS encodes with tf.image; PIL is equivalent
    buf = io.BytesIO()
    Image.fromarray(np.asarray(img)).save(buf, format="PNG")
    return buf.getvalue()

  monkeypatch.setattr(encoder, "_encode_image", encode_png)
  data = _TEST_IMAGES
  _test_builder_class()(data_dir=tmp_path, file_format="array_record").download_and_prepare()
  ds = I.load_tfds("tsjax_test_images", "train", tmp_path)
  assert ds.images.shape == (21, 8, 8, 3) and ds.num_classes == 4
  order = np.argsort([int(np.where((data["train"] == im).all((1, 2, 3)))[0][0])
                      for im in ds.images])  # TFDS shuffles on write
  np.testing.assert_array_equal(ds.images[order], data["train"])
  np.testing.assert_array_equal(ds.labels[order], np.arange(21) % 4)
  assert len(I.load_tfds("tsjax_test_images", "test", tmp_path)) == 6


# ------------------------------------------------------ pickled CIFAR folders

def _cifar_pixels(n, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3),
                                              dtype=np.uint8)


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, to override
  """Writes bytes and str as Python 2 ``str`` (SHORT_BINSTRING /
  BINSTRING), as in the CIFAR archives, which were pickled by Python 2."""

  def _save_py2_str(self, obj):
    raw = obj if isinstance(obj, bytes) else obj.encode("latin1")
    if len(raw) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
    else:
      self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
    self.memoize(obj)

  dispatch = dict(pickle._Pickler.dispatch)
  dispatch[bytes] = _save_py2_str
  dispatch[str] = _save_py2_str


def _write_cifar_pickle(path, obj, py2_format):
  """Protocol 2 with bytes keys. ``py2_format``: the CIFAR site's files
  (Python 2 strings, arrays naming ``numpy.core.multiarray``); else what
  Python 3 + NumPy 2 write (``_codecs.encode``, ``numpy._core``)."""
  if not py2_format:
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return
  buf = io.BytesIO()
  _Py2Pickler(buf, protocol=2).dump(obj)
  raw = buf.getvalue().replace(b"numpy._core.multiarray\n",
                               b"numpy.core.multiarray\n")
  assert b"_codecs" not in raw and b"numpy._core" not in raw
  path.write_bytes(raw)


def _fake_cifar(root, name, n=3, py2_format=True):
  """A tiny pickled folder under ``root``; returns ``{split: (images,
  labels)}`` as NHWC uint8 / int."""
  folder = root / {"cifar10": "cifar-10-batches-py",
                   "cifar100": "cifar-100-python"}[name]
  folder.mkdir(parents=True)
  classes = 10 if name == "cifar10" else 100
  files = ({"train": [f"data_batch_{i}" for i in range(1, 6)],
            "test": ["test_batch"]} if name == "cifar10"
           else {"train": ["train"], "test": ["test"]})
  out = {}
  for split, names in files.items():
    imgs, labs = [], []
    for j, file in enumerate(names):
      x = _cifar_pixels(n + j, seed=len(imgs) + 10 * (split == "test"))
      y = [(7 * k + j) % classes for k in range(n + j)]
      data = x.transpose(0, 3, 1, 2).reshape(len(x), 3072)  # RRR..GGG..BBB..
      entry = {b"batch_label": file.encode(), b"data": data,
               b"filenames": [b"f%d.png" % k for k in range(len(x))]}
      if name == "cifar10":
        entry[b"labels"] = y
      else:
        entry[b"fine_labels"] = y
        entry[b"coarse_labels"] = [v // 5 for v in y]
      _write_cifar_pickle(folder / file, entry, py2_format)
      imgs.append(x)
      labs += y
    out[split] = (np.concatenate(imgs), np.asarray(labs))
  meta = ({b"label_names": [b"c%d" % k for k in range(10)]} if name == "cifar10"
          else {b"fine_label_names": [b"f%d" % k for k in range(100)],
                b"coarse_label_names": [b"c%d" % k for k in range(20)]})
  meta_file = "batches.meta" if name == "cifar10" else "meta"
  _write_cifar_pickle(folder / meta_file, meta, py2_format)
  return folder, out


@pytest.mark.parametrize("py2_format", [True, False])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickled_folder(tmp_path, name, py2_format):
  folder, want = _fake_cifar(tmp_path, name, py2_format=py2_format)
  # data_dir holding the folder, or the folder itself, through load_dataset.
  for data_dir in (tmp_path, folder):
    for split in ("train", "test"):
      ds = I.load_dataset(name, split, data_dir)
      np.testing.assert_array_equal(ds.images, want[split][0])
      np.testing.assert_array_equal(ds.labels, want[split][1])
      assert ds.images.dtype == np.uint8 and ds.images.flags.c_contiguous
      assert ds.labels.dtype == np.int32 and ds.split == split
      assert ds.name == name and ds.image_shape == (32, 32, 3)
      assert ds.num_classes == I.dataset_num_classes(name)
      assert (ds.mean, ds.std) == I.dataset_stats(name)  # as the TFDS path
  n_train = 3 + 4 + 5 + 6 + 7 if name == "cifar10" else 3
  assert len(I.load_dataset(name, "train", tmp_path)) == n_train
  with pytest.raises(ValueError, match="'train' or 'test'"):
    I.load_cifar_pickle(name, "train[:90%]", folder)


def test_cifar_pickle_pixel_layout(tmp_path):
  """``data`` rows are 1024 R, 1024 G, 1024 B values in row-major order."""
  folder, _ = _fake_cifar(tmp_path, "cifar10", n=1)
  row = np.arange(3072) % 251
  _write_cifar_pickle(folder / "test_batch",
                      {b"data": row[None].astype(np.uint8), b"labels": [3]},
                      True)
  ds = I.load_cifar_pickle("cifar10", "test", tmp_path)
  c, h, w = 2, 5, 7
  assert ds.images[0, h, w, c] == row[c * 1024 + h * 32 + w]
  assert list(ds.labels) == [3]


def test_cifar_pickle_missing_and_bad_files(tmp_path):
  folder, _ = _fake_cifar(tmp_path, "cifar10")
  os.remove(folder / "data_batch_3")
  with pytest.raises(I.DatasetNotPreparedError) as err:
    I.load_dataset("cifar10", "train", tmp_path)
  msg = str(err.value)
  assert "'data_batch_3' not found" in msg and "data.data_dir" in msg
  assert "cifar-10-python.tar.gz" in msg and "tar xzf" in msg
  assert len(I.load_dataset("cifar10", "test", tmp_path)) == 3  # test intact
  _write_cifar_pickle(folder / "test_batch",
                      {b"data": np.zeros((2, 3071), np.uint8),
                       b"labels": [0, 1]}, False)
  with pytest.raises(ValueError, match=r"uint8 data \[N, 3072\]"):
    I.load_dataset("cifar10", "test", tmp_path)
  _write_cifar_pickle(folder / "test_batch",
                      {b"data": np.zeros((2, 3072), np.uint8),
                       b"labels": [0, 10]}, False)
  with pytest.raises(ValueError, match="labels must be in 0..9"):
    I.load_dataset("cifar10", "test", tmp_path)
  (folder / "test_batch").write_bytes(b"not a pickle")
  with pytest.raises(ValueError, match="not a readable CIFAR pickle"):
    I.load_dataset("cifar10", "test", tmp_path)


class _Exploit:
  def __reduce__(self):
    return (os.mkdir, ("PWNED",))


def test_cifar_pickle_refuses_code(tmp_path, monkeypatch):
  """A pickle naming any other global (here os.mkdir) is refused unrun."""
  folder, _ = _fake_cifar(tmp_path, "cifar10")
  (folder / "test_batch").write_bytes(pickle.dumps(
      {b"data": _Exploit(), b"labels": []}, protocol=2))
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="refusing to load the global"):
    I.load_dataset("cifar10", "test", tmp_path)
  assert not (tmp_path / "PWNED").exists()


def test_cifar_without_pickled_folder_uses_tfds(tmp_path, no_network):
  tfds = pytest.importorskip("tensorflow_datasets")
  _fake_cifar(tmp_path, "cifar100")  # CIFAR-100's folder: not CIFAR-10's
  assert I.find_cifar_folder("cifar10", tmp_path) is None
  with tfds.testing.mock_data(num_examples=5):
    ds = I.load_dataset("cifar10", "train", tmp_path)
    # "tfds:" forces TFDS even where the pickled folder exists.
    ds100 = I.load_dataset("tfds:cifar100", "train", tmp_path)
  assert len(ds) == 5 and ds.num_classes == 10
  assert len(ds100) == 5 and ds100.num_classes == 100
  assert (ds100.mean, ds100.std) == I.dataset_stats("cifar100")


# -------------------------------------------------------------- tfds:NAME

def test_tfds_name_any_image_classification_data_set(tmp_path, no_network,
                                                    monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=9):
    train = I.load_dataset("tfds:mnist", "train", tmp_path)
    test = I.load_dataset("tfds:mnist", "test", tmp_path)
    svhn = I.load_dataset("tfds:svhn_cropped", "test", tmp_path)  # test first
    svhn_train = I.load_tfds("svhn_cropped", "train", tmp_path)
    assert I.dataset_num_classes("tfds:svhn_cropped", tmp_path) == 10
    assert I.dataset_stats("tfds:svhn_cropped", tmp_path) == (
        svhn_train.mean, svhn_train.std)
    # A run on a tfds: data set reloads as a teacher from its own data dir.
    run_cfg = ml_collections.ConfigDict({
        "data": {"name": "tfds:svhn_cropped", "data_dir": str(tmp_path)},
        "model": {"name": "small_cnn", "kwargs": {}}})
    seen = []
    for fn in ("dataset_stats", "dataset_num_classes"):
      real = getattr(I, fn)
      monkeypatch.setattr(I, fn, functools.partial(
          lambda real, name, data_dir=None: seen.append(data_dir)
          or real(name, data_dir), real))
    teacher = teachers.model_from_config(run_cfg)
    assert seen == [str(tmp_path)] * 2
    assert teacher.num_classes == 10
    assert (tuple(teacher.mean), tuple(teacher.std)) == (
        svhn_train.mean, svhn_train.std)
  assert train.images.shape == (9, 28, 28, 1) and train.num_classes == 10
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert train.name == "mnist" and train.split == "train"
  # mean / std: the train split's, on every split.
  mean, std = I.channel_stats(train.images)
  assert (train.mean, train.std) == (mean, std) == (test.mean, test.std)
  assert len(mean) == 1 and 0 < mean[0] < 1 and std[0] > 0
  assert svhn.images.shape == (9, 32, 32, 3) and svhn.num_classes == 10
  assert (svhn.mean, svhn.std) == I.channel_stats(svhn_train.images)
  assert len(svhn.mean) == 3


def test_tfds_name_errors(tmp_path, no_network):
  tfds = pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="unknown TFDS data set.*data.name"):
    I.load_dataset("tfds:no_such_dataset_xyz", "train", tmp_path)
  with pytest.raises(I.DatasetNotPreparedError, match="tfds build mnist"):
    I.load_dataset("tfds:mnist", "train", tmp_path)
  with tfds.testing.mock_data(num_examples=4):
    # Mock oxford_flowers102 images have random sizes.
    with pytest.raises(ValueError, match="images have different shapes"):
      I.load_dataset("tfds:oxford_flowers102", "train", tmp_path)
    with pytest.raises(ValueError, match="no feature 'img'"):
      I.load_tfds("mnist", "train", tmp_path, image_key="img")


# ------------------------------------------------------------ data.name check

def test_tfds_feature_keys_inferred():
  """Non-standard feature names: the only image / ClassLabel feature."""

  class Feature:
    def __init__(self, shape=(), num_classes=None):
      self.shape = shape
      if num_classes is not None:
        self.num_classes = num_classes

  class Source:
    def __init__(self, **features):
      self.dataset_info = type("Info", (), {"features": features})()

  src = Source(img=Feature((8, 8, 3)), cls=Feature(num_classes=5),
               id=Feature(), mask=Feature((8, 8)))
  assert I._feature_keys(src, "x") == ("img", "cls")
  src = Source(image=Feature((8, 8, 1)), label=Feature(num_classes=2),
               other=Feature(num_classes=7))
  assert I._feature_keys(src, "x") == ("image", "label")
  src = Source(a=Feature((8, 8, 3)), b=Feature((4, 4, 3)),
               cls=Feature(num_classes=5))
  with pytest.raises(ValueError, match="which feature is the image.*image_key"):
    I._feature_keys(src, "x")
  assert I._feature_keys(src, "x", image_key="b") == ("b", "cls")


def test_check_name():
  for name in ("cifar10", "fashion_mnist", "tiny_imagenet", "tfds:mnist",
               "tfds:imagenette/160px:1.0.0", "tfds:cifar10:3.*"):
    cfg = ml_collections.ConfigDict({"data": {"name": name}})
    assert I.check_name(cfg) == name
  for name, match in (("svhn", "must be one of.*'tfds:NAME'.*got 'svhn'"),
                      ("tfds:", "must be 'tfds:' followed by a TFDS data"),
                      ("tfds:Bad Name", "must be 'tfds:'.*got 'tfds:Bad Name'"),
                      (3, "must be one of.*got 3")):
    cfg = ml_collections.ConfigDict({"data": {"name": name}})
    with pytest.raises(ConfigError, match="config field 'data.name' " + match):
      I.check_name(cfg)
  with pytest.raises(ConfigError, match="'data.name' is missing"):
    I.check_name({"data": {}})
  with pytest.raises(ValueError, match="TFDS data set name"):
    I.load_dataset("tfds:UPPER", "train")


# -------------------------------------------------------------- TinyImageNet

def _fake_tiny(root, wnids=("n03", "n01", "n02"), per_class=2, n_val=4):
  from PIL import Image
  base = root / "tiny-imagenet-200"
  (base / "val" / "images").mkdir(parents=True)
  (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
  for j, w in enumerate(wnids):
    d = base / "train" / w / "images"
    d.mkdir(parents=True)
    for k in range(per_class):
      mode = "L" if k == 0 else "RGB"  # TinyImageNet has a few grey images
      Image.new(mode, (64, 64), 40 * j + 10 if mode == "L" else (40 * j, 7, 200)
                ).save(d / f"{w}_{k}.JPEG", format="JPEG")
  rows = []
  for k in range(n_val):
    w = wnids[k % len(wnids)]
    Image.new("RGB", (64, 64), (k, k, k)).save(
        base / "val" / "images" / f"val_{k}.JPEG", format="JPEG")
    rows.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
  (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")


def test_tiny_imagenet_folder(tmp_path):
  _fake_tiny(tmp_path)
  tr = I.load_dataset("tiny_imagenet", "train", tmp_path)
  assert tr.images.shape == (6, 64, 64, 3) and tr.images.dtype == np.uint8
  assert tr.num_classes == 3
  # Classes in sorted wnid order (ImageFolder): n01 -> 0, n02 -> 1, n03 -> 2.
  np.testing.assert_array_equal(tr.labels, [0, 0, 1, 1, 2, 2])
  va = I.load_tiny_imagenet("test", tmp_path / "tiny-imagenet-200")
  np.testing.assert_array_equal(va.labels, [2, 0, 1, 2])  # n03, n01, n02, n03
  assert va.split == "validation" and va.images.shape == (4, 64, 64, 3)


def test_tiny_imagenet_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="tiny-imagenet-200.*data.data_dir"):
    I.load_dataset("tiny_imagenet", "train", tmp_path)
  with pytest.raises(FileNotFoundError, match="data.data_dir"):
    I.load_dataset("tiny_imagenet", "train", None)
  with pytest.raises(ValueError, match="unknown data set"):
    I.load_dataset("mnist", "train")


def test_load_from_config(tmp_path):
  import ml_collections
  _fake_fmnist(tmp_path)
  cfg = ml_collections.ConfigDict({"data": {"name": "fashion_mnist",
                                            "data_dir": str(tmp_path)}})
  assert len(I.load_from_config(cfg, "test")) == 5
  cfg.data.name = "svhn"
  with pytest.raises(ConfigError, match="data.name"):
    I.load_from_config(cfg)
  _fake_cifar(tmp_path, "cifar10")
  cfg.data.name = "cifar10"
  assert len(I.load_from_config(cfg, "test")) == 3


# --------------------------------------------------------------- val split

def test_split_validation_disjoint_deterministic():
  n = 103
  x = np.arange(n)[:, None, None, None].astype(np.uint8)
  y = (np.arange(n) % 7).astype(np.int32)
  (xt, yt), (xv, yv) = I.split_validation(x, y, 20, seed=5)
  assert len(xv) == 20 and len(xt) == 83
  ids_t, ids_v = xt[:, 0, 0, 0], xv[:, 0, 0, 0]
  assert not set(ids_t) & set(ids_v)
  np.testing.assert_array_equal(np.sort(np.concatenate([ids_t, ids_v])), np.arange(n))
  np.testing.assert_array_equal(yv, ids_v % 7)
  (_, _), (xv2, _) = I.split_validation(x, y, 20, seed=5)
  np.testing.assert_array_equal(xv, xv2)
  (_, _), (xv3, _) = I.split_validation(x, y, 20, seed=6)
  assert not np.array_equal(xv, xv3)
  (_, _), (_, ys) = I.split_validation(x, y, 21, seed=0, stratify=True)
  assert len(ys) == 21 and np.all(np.bincount(ys, minlength=7) == 3)
  with pytest.raises(ValueError, match="num_val"):
    I.split_validation(x, y, n + 1, seed=0)


def test_split_dataset():
  ds = I.ImageDataset(np.zeros((10, 2, 2, 1), np.uint8), np.arange(10, dtype=np.int32),
                      10, (0.5,), (0.25,), "toy", "train")
  tr, va = I.split_dataset(ds, 3, seed=0)
  assert len(tr) == 7 and len(va) == 3 and va.split == "validation"
  assert va.num_classes == 10 and va.mean == (0.5,)


# ---------------------------------------------------------------- iterators

def _toy(n):
  x = np.zeros((n, 4, 4, 1), np.uint8)
  x[:, 0, 0, 0] = np.arange(n) % 256  # each image carries its index
  x[:, 0, 1, 0] = np.arange(n) // 256
  return x, np.arange(n, dtype=np.int32)


def _ids(batch):
  img = np.asarray(batch["image"]).astype(np.int64)
  return img[:, 0, 0, 0] + 256 * img[:, 0, 1, 0]


def test_train_batches_epochs_and_sharding():
  assert jax.device_count() == 4, "tests/conftest.py forces 4 CPU devices"
  x, y = _toy(64)
  it = I.train_batches(x, y, 16, seed=3, num_epochs=3)
  batches = list(it)
  assert len(batches) == 12
  b = batches[0]
  assert b["image"].shape == (16, 4, 4, 1) and b["image"].dtype == jnp.uint8
  assert b["label"].dtype == jnp.int32
  assert len(b["image"].sharding.device_set) == 4
  assert {s.data.shape for s in b["image"].addressable_shards} == {(4, 4, 4, 1)}
  epochs = []
  for e in range(3):
    labels = np.concatenate([np.asarray(bb["label"]) for bb in batches[4 * e:4 * e + 4]])
    ids = np.concatenate([_ids(bb) for bb in batches[4 * e:4 * e + 4]])
    np.testing.assert_array_equal(labels, ids)  # images travel with labels
    np.testing.assert_array_equal(np.sort(labels), np.arange(64))  # once each
    epochs.append(labels)
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
  assert not np.array_equal(epochs[0], np.arange(64))
  # Deterministic in the seed; resuming at a step gives the same batches.
  again = list(I.train_batches(x, y, 16, seed=3, num_epochs=3, start_step=5))
  for b1, b2 in zip(batches[5:], again):
    np.testing.assert_array_equal(np.asarray(b1["label"]), np.asarray(b2["label"]))
  other = next(I.train_batches(x, y, 16, seed=4))
  assert not np.array_equal(np.asarray(other["label"]), epochs[0][:16])


def test_train_batches_stream_not_divisible():
  x, y = _toy(50)
  batches = list(I.train_batches(x, y, 8, seed=0, num_epochs=2, shard=False))
  assert len(batches) == (2 * 50) // 8
  stream = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(np.sort(stream[:50]), np.arange(50))
  np.testing.assert_array_equal(stream[:50], I.epoch_permutation(50, 0, 0))
  np.testing.assert_array_equal(stream[50:], I.epoch_permutation(50, 0, 1)[:46])
  assert isinstance(batches[0]["image"], np.ndarray)


def test_batch_size_divisibility_errors():
  x, y = _toy(20)
  with pytest.raises(ValueError, match="divisible by the number of devices.*4"):
    next(I.train_batches(x, y, 6, seed=0))
  with pytest.raises(ValueError, match="divisible"):
    next(I.eval_batches(x, y, 10))
  with pytest.raises(ValueError, match="positive integer"):
    next(I.train_batches(x, y, 0, seed=0, shard=False))
  assert next(I.eval_batches(x, y, 6, shard=False))["image"].shape[0] == 6


def test_process_rows_single_process():
  assert I.process_rows(I.batch_sharding(), 12) == (0, 12)


@pytest.mark.parametrize("n,bs", [(37, 8), (32, 8), (3, 8), (1, 4)])
def test_eval_batches_count_every_example_once(n, bs):
  x, y = _toy(n)
  batches = list(I.eval_batches(x, y, bs))
  assert len(batches) == I.num_eval_batches(n, bs) == -(-n // bs)
  seen = []
  for b in batches:
    assert b["image"].shape == (bs, 4, 4, 1) and b["mask"].dtype == jnp.bool_
    assert len(b["mask"].sharding.device_set) == 4
    mask = np.asarray(b["mask"])
    lab = np.asarray(b["label"])
    np.testing.assert_array_equal(_ids(b)[mask], lab[mask])
    assert np.all(np.asarray(b["image"])[~mask] == 0) and np.all(lab[~mask] == 0)
    seen.append(lab[mask])
  seen = np.concatenate(seen)
  np.testing.assert_array_equal(seen, np.arange(n))  # in order, exactly once
  assert sum(int(np.asarray(b["mask"]).sum()) for b in batches) == n


def test_masked_metric_on_device():
  x, y = _toy(37)
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.int32)

  @jax.jit
  def step(b):
    v = I.to_float(b["image"], jnp.float32)[:, 0, 0, 0] * 255
    return jnp.sum(jnp.where(b["mask"], v, 0)), jnp.sum(b["mask"].astype(jnp.int32))

  for b in I.eval_batches(x, y, 8):
    s, c = step(b)
    total, count = total + s, count + c
  assert int(count) == 37 and float(total) == float(np.arange(37).sum())


def test_to_float_and_normalize():
  u = jnp.asarray([[0, 255]], jnp.uint8)[..., None]
  f = I.to_float(u, jnp.float32)
  assert f.dtype == jnp.float32 and float(f.max()) == 1.0 and float(f.min()) == 0.0
  z = I.normalize(f, (0.5,), (0.5,))
  np.testing.assert_allclose(np.asarray(z).ravel(), [-1.0, 1.0])
  assert z.dtype == jnp.float32


def test_image_dataset_validates():
  with pytest.raises(ValueError, match="uint8"):
    I.ImageDataset(np.zeros((2, 2, 2, 1), np.float32), np.zeros(2, np.int32), 2,
                   (0.0,), (1.0,))
  with pytest.raises(ValueError, match="channels"):
    I.ImageDataset(np.zeros((2, 2, 2, 3), np.uint8), np.zeros(2, np.int32), 2,
                   (0.0,), (1.0,))
