"""Tests for segldm_jax.data: sources, label handling, transforms, pipeline."""
import io
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from segldm_jax.data import (IGNORE_ID, DataError, FolderSource, TfdsSource,
                             check_num_classes, images_to_model_range,
                             load_record, make_dataset, make_source,
                             model_range_to_images)
from segldm_jax.data.synthetic import SyntheticSource

SFLCKR_PAIRS = (
    "canada/2883773_881c197107_c",
    "geysir/3542389801_a2cbfee1e1_b",
    "geysir/4748115806_7219c2b3be_b",
    "norway/20099378793_cc2df820af_b",
    "norway/25735082181_999927fe5a_b",
)


def _save(path: pathlib.Path, array: np.ndarray) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)
  return path


def _pair(root: pathlib.Path, rel: str, image: np.ndarray,
          mask: np.ndarray) -> None:
  _save(root / "images" / f"{rel}.png", image)
  _save(root / "masks" / f"{rel}.png", mask)


def _folder(root: pathlib.Path, **kwargs) -> FolderSource:
  return FolderSource(root / "images", root / "masks", **kwargs)


@pytest.fixture
def sflckr(data_dir):
  return data_dir / "sflckr"


@pytest.fixture
def sflckr_copy(sflckr, tmp_path):
  root = tmp_path / "sflckr"
  shutil.copytree(sflckr / "images", root / "images")
  shutil.copytree(sflckr / "segmentations", root / "masks")
  return root


def _close(iterator) -> None:
  if hasattr(iterator, "close"):
    iterator.close()


# --------------------------------------------------------------------------
# Folder source: pairing and errors.


def test_sflckr_pairs_decode_to_the_stored_ids(sflckr):
  source = FolderSource(sflckr / "images", sflckr / "segmentations",
                        num_classes=182)
  assert source.keys == list(SFLCKR_PAIRS)
  for i, rel in enumerate(SFLCKR_PAIRS):
    assert source[i]["image_path"].endswith(f"images/{rel}.jpg")
    assert source[i]["mask_path"].endswith(f"segmentations/{rel}.png")
    record = load_record(source, i)
    stored = np.asarray(Image.open(sflckr / "segmentations" / f"{rel}.png"))
    assert record["image"].dtype == np.uint8
    assert record["image"].shape == stored.shape + (3,)
    np.testing.assert_array_equal(record["labels"], stored)
    assert record["labels"].max() < 182


def test_pairing_is_by_relative_path_not_sorted_position(sflckr_copy, caplog):
  # An extra image in a category that sorts first and an extra mask in one
  # that sorts last: pairing by sorted position would shift every pair.
  extra_image = _save(sflckr_copy / "images" / "aaa" / "zzz_extra.png",
                      np.zeros((4, 4, 3), np.uint8))
  extra_mask = _save(sflckr_copy / "masks" / "zzz" / "aaa_extra.png",
                     np.zeros((4, 4), np.uint8))
  images = sorted(p for p in (sflckr_copy / "images").rglob("*.*"))
  masks = sorted(p for p in (sflckr_copy / "masks").rglob("*.*"))
  assert images[0].stem != masks[0].stem  # sorted order would mis-pair

  with pytest.raises(DataError) as error:
    _folder(sflckr_copy, num_classes=182)
  assert str(extra_image) in str(error.value)
  assert str(extra_mask) in str(error.value)
  assert "skip_unpaired" in str(error.value)

  with caplog.at_level(logging.WARNING):
    source = _folder(sflckr_copy, num_classes=182, skip_unpaired=True)
  assert "zzz_extra" in caplog.text and "aaa_extra" in caplog.text
  assert source.keys == list(SFLCKR_PAIRS)
  for i, rel in enumerate(SFLCKR_PAIRS):
    stored = np.asarray(Image.open(sflckr_copy / "masks" / f"{rel}.png"))
    np.testing.assert_array_equal(load_record(source, i)["labels"], stored)


def test_unpaired_error_lists_first_few_and_count(tmp_path):
  _pair(tmp_path, "a/pair", np.zeros((4, 4, 3), np.uint8),
        np.zeros((4, 4), np.uint8))
  for i in range(7):
    _save(tmp_path / "images" / "b" / f"lonely{i}.JPG",
          np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(DataError, match=r"images without a mask .*: 7 \(") as e:
    _folder(tmp_path, num_classes=3)
  assert "lonely0.JPG" in str(e.value) and "and 2 more" in str(e.value)
  assert "lonely6.JPG" not in str(e.value)
  source = _folder(tmp_path, num_classes=3, skip_unpaired=True)
  assert source.keys == ["a/pair"]


def test_image_extensions_are_case_insensitive(tmp_path):
  image = np.full((6, 5, 3), 100, np.uint8)
  for rel, ext in (("x/one", ".JPG"), ("x/two", ".jpeg"), ("y/three", ".webp"),
                   ("y/four", ".Bmp"), ("five", ".png")):
    _save(tmp_path / "images" / f"{rel}{ext}", image)
    _save(tmp_path / "masks" / f"{rel}.png", np.ones((6, 5), np.uint8))
  source = _folder(tmp_path, num_classes=2)
  assert source.keys == ["five", "x/one", "x/two", "y/four", "y/three"]
  for i in range(len(source)):
    assert load_record(source, i)["image"].shape == (6, 5, 3)


def test_empty_or_missing_folder_errors_name_the_folder(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(DataError, match="no image files .* under .*images"):
    _folder(tmp_path, num_classes=3)
  _save(tmp_path / "images" / "a.jpg", np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(DataError, match="no mask files .* under .*masks"):
    _folder(tmp_path, num_classes=3)
  with pytest.raises(DataError, match="does not exist: .*nowhere"):
    FolderSource(tmp_path / "nowhere", tmp_path / "masks", num_classes=3)


def test_size_mismatch_error_names_both_files(tmp_path):
  _save(tmp_path / "images" / "p.png", np.zeros((8, 10, 3), np.uint8))
  _save(tmp_path / "masks" / "p.png", np.zeros((9, 10), np.uint8))
  source = _folder(tmp_path, num_classes=3)
  with pytest.raises(DataError) as error:
    load_record(source, 0)
  message = str(error.value)
  assert "size mismatch" in message and "10x8" in message and "10x9" in message
  assert str(tmp_path / "images" / "p.png") in message
  assert str(tmp_path / "masks" / "p.png") in message


def test_out_of_range_label_error_names_file_and_value(tmp_path):
  mask = np.zeros((4, 4), np.uint8)
  mask[1, 2] = 200
  _pair(tmp_path, "c/bad", np.zeros((4, 4, 3), np.uint8), mask)
  source = _folder(tmp_path, num_classes=182)
  with pytest.raises(DataError) as error:
    load_record(source, 0)
  assert str(tmp_path / "masks" / "c" / "bad.png") in str(error.value)
  assert "label value 200" in str(error.value)
  assert "num_classes=182" in str(error.value)


def test_rgb_mask_without_palette_is_an_error(tmp_path):
  _pair(tmp_path, "rgb", np.zeros((4, 4, 3), np.uint8),
        np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(DataError, match="mode RGB.*palette="):
    load_record(_folder(tmp_path, num_classes=3), 0)


def test_num_classes_above_255_is_a_value_error(tmp_path):
  for bad in (256, 1000, 0):
    with pytest.raises(ValueError, match="num_classes"):
      check_num_classes(bad)
  with pytest.raises(ValueError, match="at most 255"):
    FolderSource(tmp_path, tmp_path / "m", num_classes=256)
  assert check_num_classes(255) == 255


# --------------------------------------------------------------------------
# Label maps: ignore label, palette, remap, one-hot.


def test_ignore_label_becomes_ignore_id_and_zero_one_hot(tmp_path):
  stored = np.array([[0, 5, 255], [181, 255, 7]], np.uint8)
  _pair(tmp_path, "i", np.zeros((2, 3, 3), np.uint8), stored)
  labels = load_record(_folder(tmp_path, num_classes=182, ignore_label=255),
                       0)["labels"]
  np.testing.assert_array_equal(labels, stored)  # 255 is IGNORE_ID already
  one_hot = np.asarray(jax.nn.one_hot(jnp.asarray(labels), 182))
  ignored = stored == 255
  np.testing.assert_array_equal(one_hot[ignored], 0.0)
  np.testing.assert_array_equal(one_hot[~ignored].sum(-1), 1.0)
  np.testing.assert_array_equal(one_hot[~ignored].argmax(-1), stored[~ignored])
  # Without ignore_label, 255 is an out-of-range value.
  with pytest.raises(DataError, match="label value 255"):
    load_record(_folder(tmp_path, num_classes=182), 0)


def test_ade20k_style_zero_ignore_with_remap(tmp_path):
  stored = np.array([[0, 1, 2], [3, 0, 1]], np.uint8)
  _pair(tmp_path, "ade", np.zeros((2, 3, 3), np.uint8), stored)
  remap_file = tmp_path / "remap.json"
  remap_file.write_text(json.dumps({"1": 0, "2": 1, "3": 2}))
  for remap in ({1: 0, 2: 1, 3: 2}, str(remap_file)):
    source = _folder(tmp_path, num_classes=3, ignore_label=0, remap=remap)
    np.testing.assert_array_equal(
        load_record(source, 0)["labels"],
        [[IGNORE_ID, 0, 1], [2, IGNORE_ID, 0]])


def test_remap_applies_before_the_range_check(tmp_path):
  stored = np.array([[10, 20, 30, 40]], np.uint8)
  _pair(tmp_path, "r", np.zeros((1, 4, 3), np.uint8), stored)
  source = _folder(tmp_path, num_classes=3,
                   remap={10: 0, 20: 1, 30: 2, 40: IGNORE_ID})
  np.testing.assert_array_equal(load_record(source, 0)["labels"],
                                [[0, 1, 2, IGNORE_ID]])
  source = _folder(tmp_path, num_classes=3, remap={10: 0, 20: 1, 30: 2})
  with pytest.raises(DataError, match="label value 40"):
    load_record(source, 0)
  bad_file = tmp_path / "bad.json"
  bad_file.write_text("[1, 2]")
  with pytest.raises(DataError, match="bad.json"):
    _folder(tmp_path, num_classes=3, remap=str(bad_file))


@pytest.mark.parametrize("fmt", ["json_list", "json_dict", "text"])
def test_palette_maps_colours_to_ids(tmp_path, fmt):
  colours = [(0, 0, 0), (255, 0, 0), (0, 128, 255)]
  if fmt == "json_list":
    palette_file = tmp_path / "palette.json"
    palette_file.write_text(json.dumps([list(c) for c in colours]))
  elif fmt == "json_dict":
    palette_file = tmp_path / "palette.json"
    palette_file.write_text(json.dumps({str(i): list(c)
                                        for i, c in enumerate(colours)}))
  else:
    palette_file = tmp_path / "palette.txt"
    palette_file.write_text("# id r g b\n" + "\n".join(
        f"{i} {r} {g} {b}" for i, (r, g, b) in enumerate(colours)) + "\n\n")
  ids = np.array([[0, 1, 2], [2, 2, 1]], np.uint8)
  rgb = np.array(colours, np.uint8)[ids]
  _pair(tmp_path, "p", np.zeros((2, 3, 3), np.uint8), rgb)
  source = _folder(tmp_path, num_classes=3, palette=str(palette_file))
  np.testing.assert_array_equal(load_record(source, 0)["labels"], ids)
  # Colour 0 as the ignore label.
  source = _folder(tmp_path, num_classes=3, palette=str(palette_file),
                   ignore_label=0)
  np.testing.assert_array_equal(load_record(source, 0)["labels"],
                                [[IGNORE_ID, 1, 2], [2, 2, 1]])


def test_palette_unknown_colour_error_names_file_and_colour(tmp_path):
  palette_file = tmp_path / "palette.txt"
  palette_file.write_text("0 0 0 0\n1 255 0 0\n")
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[1, 1] = (1, 2, 3)
  _pair(tmp_path, "q/u", np.zeros((2, 2, 3), np.uint8), rgb)
  source = _folder(tmp_path, num_classes=2, palette=str(palette_file))
  with pytest.raises(DataError) as error:
    load_record(source, 0)
  assert str(tmp_path / "masks" / "q" / "u.png") in str(error.value)
  assert "(1, 2, 3)" in str(error.value)


def test_palette_file_errors(tmp_path):
  bad = tmp_path / "bad.txt"
  bad.write_text("0 1 2\n")
  with pytest.raises(DataError, match=r"bad.txt line 1"):
    _folder(tmp_path, num_classes=2, palette=str(bad))
  clash = tmp_path / "clash.json"
  clash.write_text(json.dumps([[1, 2, 3], [1, 2, 3]]))
  with pytest.raises(DataError, match=r"colour \(1, 2, 3\) is given to ids"):
    _folder(tmp_path, num_classes=2, palette=str(clash))


def test_palette_png_masks_use_stored_indices_without_palette(tmp_path):
  ids = np.array([[0, 1], [2, 1]], np.uint8)
  mask = Image.fromarray(ids, mode="P")
  mask.putpalette([9, 9, 9, 200, 0, 0, 0, 200, 0] + [0] * 759)
  (tmp_path / "masks").mkdir()
  mask.save(tmp_path / "masks" / "v.png")
  _save(tmp_path / "images" / "v.jpg", np.zeros((2, 2, 3), np.uint8))
  np.testing.assert_array_equal(
      load_record(_folder(tmp_path, num_classes=3), 0)["labels"], ids)


def test_sflckr_batch_has_182_class_ids(sflckr):
  source = FolderSource(sflckr / "images", sflckr / "segmentations",
                        num_classes=182)
  iterator = iter(make_dataset(source, image_size=64, batch_size=5, seed=0,
                               train=False, shard_index=0, shard_count=1))
  batch = next(iterator)
  assert batch["image"].shape == (5, 64, 64, 3)
  assert batch["labels"].shape == (5, 64, 64)
  assert batch["image"].dtype == batch["labels"].dtype == np.uint8
  assert int(batch["labels"].max()) < 182  # no ignore pixels in sflckr
  # sky-other (156) and mountain (134) appear in these landscapes.
  assert {134, 156} <= set(np.unique(batch["labels"]).tolist())
  _close(iterator)


def test_images_to_model_range():
  images = jnp.arange(256, dtype=jnp.uint8).reshape(1, 16, 16)
  out = np.asarray(jax.jit(images_to_model_range)(images))
  assert out.dtype == np.float32
  assert out.min() == -1.0 and out.max() == 1.0  # exact end points
  np.testing.assert_allclose(out.ravel(), np.arange(256) / 127.5 - 1,
                             atol=1e-7)
  # And back: every uint8 level survives the round trip exactly.
  back = np.asarray(jax.jit(model_range_to_images)(out))
  np.testing.assert_array_equal(back.ravel(), np.arange(256))


# --------------------------------------------------------------------------
# Transforms: image and labels stay aligned pixel by pixel.


def _blocky_pair(rng, height, width):
  """2x2-block image whose labels are a function of each pixel's colour."""
  blocks = rng.integers(0, 256, (height // 2, width // 2, 3), dtype=np.uint8)
  image = blocks.repeat(2, 0).repeat(2, 1)
  return image, _label_of(image)


def _label_of(image):
  image = image.astype(np.int64)
  return ((image[..., 0] + 3 * image[..., 1] + 7 * image[..., 2]) %
          181).astype(np.uint8)


def _find_window(image, references, size):
  """(reference, left, flipped) of each reference window equal to image."""
  hits = []
  for r, ref in enumerate(references):
    for flip in (False, True):
      view = ref[:, ::-1] if flip else ref
      for left in range(view.shape[1] - size + 1):
        if np.array_equal(image, view[:, left:left + size]):
          hits.append((r, left, flip))
  return hits


def test_random_crop_and_flip_keep_image_and_labels_aligned(tmp_path):
  rng = np.random.default_rng(0)
  references = []
  for i in range(3):
    image, labels = _blocky_pair(rng, 96, 128)
    _pair(tmp_path, f"k/{i}", image, labels)
    # Downscaling 2x: BOX keeps block colours exactly, NEAREST picks a pixel
    # inside each block, so the reference at the output scale is exact.
    references.append(image[::2, ::2])
  source = _folder(tmp_path, num_classes=181)
  iterator = iter(make_dataset(source, image_size=48, batch_size=3, seed=5,
                               shard_index=0, shard_count=1))
  seen = set()
  for _ in range(8):
    batch = next(iterator)
    for image, labels in zip(batch["image"], batch["labels"]):
      # The relation holds at every pixel after resize + crop + flip.
      np.testing.assert_array_equal(labels, _label_of(image))
      matches = _find_window(image, references, 48)
      assert len(matches) == 1, "output is not one crop of one source"
      seen.add(matches[0][1:])
  assert {flip for _, flip in seen} == {0, 1}
  assert len({left for left, _ in seen}) >= 3
  _close(iterator)


def test_eval_is_centre_crop_without_flip(tmp_path):
  rng = np.random.default_rng(1)
  image, labels = _blocky_pair(rng, 96, 128)
  _pair(tmp_path, "c", image, labels)
  batches = list(make_dataset(_folder(tmp_path, num_classes=181),
                              image_size=48, batch_size=1, seed=0,
                              train=False, shard_index=0, shard_count=1))
  assert len(batches) == 1
  np.testing.assert_array_equal(batches[0]["image"][0],
                                image[::2, ::2][:, 8:56])
  np.testing.assert_array_equal(batches[0]["labels"][0],
                                labels[::2, ::2][:, 8:56])


# --------------------------------------------------------------------------
# Pipeline: resumable state, determinism, sharding, factory.


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_restore_gives_identical_next_batches(sflckr, num_workers):
  source = FolderSource(sflckr / "images", sflckr / "segmentations",
                        num_classes=182)
  dataset = make_dataset(source, image_size=32, batch_size=2, seed=3,
                         shard_index=0, shard_count=1,
                         num_workers=num_workers)
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint
  expected = [next(iterator) for _ in range(3)]
  _close(iterator)
  restored = iter(dataset)
  restored.set_state(state)
  got = [next(restored) for _ in range(3)]
  _close(restored)
  for want, have in zip(expected, got):
    assert want["image"].tobytes() == have["image"].tobytes()
    assert want["labels"].tobytes() == have["labels"].tobytes()
  # 5 + 3 batches of 2 from 5 records cross epochs: not a trivial replay.
  assert len({b["image"].tobytes() for b in expected}) == 3


def test_same_seed_same_batches_other_seed_differs():
  source = SyntheticSource(12, 40, 8, seed=0)

  def first_batches(seed):
    iterator = iter(make_dataset(source, image_size=32, batch_size=4,
                                 seed=seed, shard_index=0, shard_count=1))
    return np.stack([next(iterator)["image"] for _ in range(3)])

  np.testing.assert_array_equal(first_batches(1), first_batches(1))
  assert not np.array_equal(first_batches(1), first_batches(2))


class _IndexSource:
  """Record i is an image filled with i (to see which records a shard gets)."""

  decoder = None

  def __len__(self):
    return 11

  def __getitem__(self, index):
    return {"image": np.full((4, 4, 3), index, np.uint8),
            "labels": np.zeros((4, 4), np.uint8)}


def _stream(shard, count, batch, n, train):
  iterator = iter(make_dataset(_IndexSource(), image_size=4, batch_size=batch,
                               seed=0, train=train, shard_index=shard,
                               shard_count=count, drop_remainder=False))
  return [next(iterator)["image"][:, 0, 0, 0].tolist() for _ in range(n)]


def test_global_batches_do_not_depend_on_the_process_count():
  # 2 processes x batch 3 == 1 process x batch 6, batch for batch, including
  # the shuffle across epochs and the random crops/flips.
  single = _stream(0, 1, 6, 6, train=True)
  parts = [_stream(p, 2, 3, 6, train=True) for p in range(2)]
  assert [a + b for a, b in zip(*parts)] == single
  flat = sum(single, [])
  assert sorted(flat[:11]) == list(range(11))  # the first epoch, whole
  assert sorted(flat[11:22]) == list(range(11))  # the next, reshuffled
  assert flat[:11] != flat[11:22]


def test_eval_shards_are_disjoint_and_cover_the_dataset():
  seen = [sum(_stream(p, 2, 1, 6 - p, train=False), []) for p in range(2)]
  assert seen[0] == [0, 2, 4, 6, 8, 10] and seen[1] == [1, 3, 5, 7, 9]


def test_default_shard_is_this_jax_process():
  dataset = make_dataset(_IndexSource(), image_size=4, batch_size=11, seed=0,
                         train=False)
  (batch,) = list(dataset)
  assert sorted(batch["image"][:, 0, 0, 0].tolist()) == list(range(11))


def test_make_source_from_config(sflckr):
  config = ml_collections.ConfigDict(dict(
      source="folder", image_dir=str(sflckr / "images"),
      mask_dir=str(sflckr / "segmentations"), num_classes=182,
      ignore_label=None, palette="", remap=None, skip_unpaired=False,
      tfds_name="", tfds_split="train", tfds_data_dir="", image_key="image",
      mask_key="segmentation_mask", num_records=0, seed=0, image_size=64))
  source = make_source(config)
  assert isinstance(source, FolderSource) and len(source) == 5
  config.source = "synthetic"
  config.num_records = 7
  config.num_classes = 20
  config.seed = 4
  source = make_source(config)
  assert isinstance(source, SyntheticSource) and len(source) == 7
  np.testing.assert_array_equal(source[3]["labels"],
                                SyntheticSource(7, 64, 20, 4)[3]["labels"])
  config.source = "nope"
  with pytest.raises(ValueError, match="unknown data source 'nope'"):
    make_source(config)


# --------------------------------------------------------------------------
# TFDS source, offline: a tiny array_record dataset built by the test.


def _png(array: np.ndarray) -> bytes:
  # Encoded bytes: tfds encodes numpy images with TensorFlow, bytes with no
  # TensorFlow at all.
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _tiny_builder_class():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Unregistered, so readers must find the dataset from its files alone
  # (as a fresh process or a grain worker does).
  with tfds.core.registered.skip_registration():

    class TinySegmentation(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "photo": tfds.features.Image(shape=(None, None, 3)),
                "mask": tfds.features.Image(shape=(None, None, 1)),
            }))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(6),
                "validation": self._generate_examples(2)}

      def _generate_examples(self, count):
        for i in range(count):
          image, labels = _tfds_example(i)
          yield i, {"photo": _png(image), "mask": _png(labels)}

  return TinySegmentation


def _tfds_example(i):
  rng = np.random.default_rng(i)
  labels = rng.integers(0, 4, (10, 12), dtype=np.uint8)
  labels[0, 0] = 9  # the ignore label
  return rng.integers(0, 256, (10, 12, 3), dtype=np.uint8), labels


def test_tfds_source_offline(tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(DataError, match="not prepared.*array_record"):
    TfdsSource("tiny_segmentation", "train", num_classes=4, data_dir=data_dir)
  _tiny_builder_class()(data_dir=data_dir,
                        file_format="array_record").download_and_prepare()

  source = TfdsSource("tiny_segmentation", "train", num_classes=4,
                      image_key="photo", mask_key="mask", data_dir=data_dir,
                      ignore_label=9)
  assert len(source) == 6
  by_image = {}
  for i in range(len(source)):
    record = source[i]
    by_image[record["image"].tobytes()] = record["labels"]
  for i in range(6):  # tfds shuffles the order; compare by content
    image, labels = _tfds_example(i)
    expected = np.where(labels == 9, IGNORE_ID, labels)
    np.testing.assert_array_equal(by_image[image.tobytes()], expected)

  with pytest.raises(DataError, match=r"tfds:tiny_segmentation/train\[\d\]: "
                     r"label value 9"):
    TfdsSource("tiny_segmentation", "train", num_classes=4,
               image_key="photo", mask_key="mask", data_dir=data_dir)[0]
  with pytest.raises(DataError, match="no feature.*'segmentation_mask'"):
    TfdsSource("tiny_segmentation", "train", num_classes=4,
               image_key="photo", data_dir=data_dir)
  with pytest.raises(DataError, match="no split 'test'"):
    TfdsSource("tiny_segmentation", "test", num_classes=4, data_dir=data_dir)

  config = ml_collections.ConfigDict(dict(
      source="tfds", tfds_name="tiny_segmentation", tfds_split="validation",
      tfds_data_dir=data_dir, image_key="photo", mask_key="mask",
      num_classes=4, ignore_label=9))
  dataset = make_dataset(make_source(config), image_size=8, batch_size=2,
                         seed=0, train=False, shard_index=0, shard_count=1)
  (batch,) = list(dataset)
  assert batch["image"].shape == (2, 8, 8, 3)
  assert set(np.unique(batch["labels"]).tolist()) <= {0, 1, 2, 3, IGNORE_ID}
