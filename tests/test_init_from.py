"""Fine-tuning a model on another dataset (issue 25): `--config.init_from`.

The source is a "converted" 182-class COCO-Stuff workdir (the `tiny`
recipe's networks with random weights, saved as convert_torch_ckpt.py saves
a released model, live and EMA UNet weights apart), and the reference's
ldm_tiny fixture (5 classes, real weights). The step-0 state, the class
maps and the frozen parameters are checked in this process; train.py runs
once, on the Cityscapes look-alike folders, is SIGKILLed and resumes.
"""

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import seg_f4
from segldm_jax import errors
from segldm_jax import formatting
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import store
from segldm_jax.config import run_config
from segldm_jax.data import class_names
from segldm_jax.models import build
from segldm_jax.runtime import sharding
from segldm_jax.training import class_map
from segldm_jax.training import init_from
from segldm_jax.training import ldm_step
from segldm_jax.training import trainable
import test_datasets
from test_train_e2e import env  # pylint: disable=unused-import

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERNEL = ("cond_stage", "channel_mapper", "kernel")
# Cityscapes' 19 classes -> the COCO-Stuff classes by_name takes.
CITYSCAPES_FROM_COCO = {
    "road": ["road"], "sidewalk": ["pavement"], "building": ["building-other"],
    "wall": ["wall-other"], "fence": ["fence"], "pole": [],
    "traffic light": ["traffic light"], "traffic sign": [],
    "vegetation": ["tree"], "terrain": ["grass"], "sky": ["sky-other"],
    "person": ["person"], "rider": ["person"], "car": ["car"],
    "truck": ["truck"], "bus": ["bus"], "train": ["train"],
    "motorcycle": ["motorcycle"], "bicycle": ["bicycle"]}


def _converted(wd: pathlib.Path, config, seed: int = 0) -> pathlib.Path:
  """`config`'s networks, random, saved as a converted workdir (EMA = live
  x 0.5, so the two differ wherever a weight is not zero)."""
  run_config.resolve(config)
  ldm = build.build_model(config.model)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  live = {"unet": build.init_params(ldm.unet, k1),
          "cond_stage": build.init_params(ldm.cond_stage, k2)}
  ema = {"unet": jax.tree.map(lambda x: x * 0.5, live["unet"])}
  store.save_model_dir(wd / "first_stage",
                       config.model.params.first_stage_config.to_dict(),
                       jax.device_get(build.init_params(ldm.first_stage, k3)))
  store.save_converted_workdir(
      wd, {"model": config.model.to_dict(),
           "first_stage": {"checkpoint": "first_stage"},
           "converted_from": "model.ckpt"},
      0, jax.device_get(live), jax.device_get(ema), {"global_step": 0})
  return wd


@pytest.fixture(scope="module")
def coco182(tmp_path_factory) -> pathlib.Path:
  c = seg_f4.get_config("tiny")
  c.data.source, c.first_stage.allow_random_init = "synthetic", True
  return _converted(tmp_path_factory.mktemp("coco182"), c)


@pytest.fixture(scope="module")
def city_root(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp("cityscapes")
  test_datasets._build(root, "cityscapes")  # pylint: disable=protected-access
  return root


def _source_params(wd, use_ema):
  config = run_config.load(wd)
  return jax.device_get(store.restore_params(
      wd, build.build_model(config.model), use_ema=use_ema)[0])


def _adopted(source, variant="cityscapes,tiny", overrides=None, **keys):
  config = seg_f4.get_config(variant)
  config.data.root = "/nonexistent"  # the folders are not read here
  config.init_from = str(source)
  for key, value in keys.items():
    *parents, last = key.split("__")
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  init_from.adopt(config, pathlib.Path("/nonexistent/workdir"), overrides)
  run_config.resolve(config)
  return config


def _start(config, mesh_axes=(("data", 1),), rules=sharding.DATA_PARALLEL):
  """The step-0 state as train.py makes it (abstract state, shardings)."""
  optimizer = ldm_step.make_optimizer(config.train)
  abstract = jax.eval_shape(
      lambda p: ldm_step.init_state(p, optimizer),
      saved_shapes.ldm_param_shapes(build.build_model(config.model)))
  devices = jax.devices()[:1] if len(mesh_axes) == 1 else None
  mesh = sharding.make_mesh(mesh_axes, devices=devices)
  shardings = sharding.shardings_from_rules(abstract, mesh, rules, min_size=0)
  return init_from.initial_state(config, optimizer, shardings), optimizer


def _leaves(tree):
  return {formatting.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- class names ------------------------------------------------------------

def test_cityscapes_names_find_their_coco_stuff_classes():
  coco = class_names.class_set({"num_classes": 182})  # by count: a converted one
  city = class_names.class_set({"num_classes": 19, "dataset": "cityscapes"})
  matches = class_names.match(city, coco)
  got = {n: [coco.names[i] for i in m.ids] for n, m in zip(city.names, matches)}
  assert got == CITYSCAPES_FROM_COCO
  why = {n: m.how for n, m in zip(city.names, matches) if not m.ids}
  assert why == {
      "pole": "no class of that name (nor its plural, -other/-stuff class or "
              "synonym) in coco-stuff",
      "traffic sign": "'street sign' is a coco-stuff class never annotated "
                      "(its row never trained)"}


def test_case_plural_synonyms_and_identity(tmp_path):
  coco = class_names.class_set({"num_classes": 182})
  ade = class_names.class_set({"num_classes": 150, "dataset": "ade20k"})
  by_ade = dict(zip(ade.names, class_names.match(ade, coco)))
  assert coco.names[by_ade["sky"].ids[0]] == "sky-other"
  assert coco.names[by_ade["building"].ids[0]] == "building-other"
  # door: COCO's thing 'door' is never annotated, its stuff class is.
  assert coco.names[by_ade["door"].ids[0]] == "door-stuff"
  names = tmp_path / "names.txt"
  names.write_text("Cars\n# a comment\nTraffic_Lights\nskies\nunicorn\n")
  mine = class_names.class_set({"num_classes": 4, "class_names": str(names)})
  assert [[coco.names[i] for i in m.ids] for m in class_names.match(mine, coco)
          ] == [["car"], ["traffic light"], ["sky-other"], []]
  same = class_names.match(ade, ade)
  assert [m.ids for m in same] == [(k,) for k in range(150)]
  unnamed = class_names.class_set({"num_classes": 7})
  assert class_names.match(unnamed, unnamed)[6].ids == (6,)
  with pytest.raises(errors.UserError, match=r"the new data's 7 classes have "
                     r"no names .* data.class_names=FILE"):
    class_names.match(unnamed, coco)
  with pytest.raises(errors.UserError, match="names 4 classes but "
                     "data.num_classes=5"):
    class_names.class_set({"num_classes": 5, "class_names": str(names)})


# --- the state at step 0 ------------------------------------------------------

def test_step0_mapped_rows_and_unet_are_the_sources_exactly(coco182, capsys):
  config = _adopted(coco182)
  printed = capsys.readouterr().out
  assert "class map (by_name): coco-stuff (182 classes) -> cityscapes (19 " \
         "classes): 17 of 19 matched" in printed
  state, _ = _start(config)
  live, ema = _source_params(coco182, False), _source_params(coco182, True)
  coco = class_names.class_set({"num_classes": 182}).names
  old = live["cond_stage"]["channel_mapper"]["kernel"]
  new = np.asarray(state.params["cond_stage"]["channel_mapper"]["kernel"])
  assert new.shape == (19, 3)
  for k, want in enumerate(CITYSCAPES_FROM_COCO.values()):
    if want:
      np.testing.assert_array_equal(new[k], old[coco.index(want[0])])
  used = np.setdiff1d(np.arange(182), [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90])
  mean = old[used].astype(np.float64).mean(0).astype(np.float32)
  np.testing.assert_array_equal(new[5], mean)  # pole
  np.testing.assert_array_equal(new[7], mean)  # traffic sign
  ours, theirs = _leaves(state.params["unet"]), _leaves(ema["unet"])
  assert all(np.array_equal(ours[k], theirs[k]) for k in theirs)
  assert not all(np.array_equal(ours[k], _leaves(live["unet"])[k]) for k in ours)
  assert all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(state.ema), jax.tree.leaves(state.params["unet"])))
  assert int(state.step) == 0 and int(state.ema_updates) == 0
  assert not any(np.any(x) for x in jax.tree.leaves(state.opt_state))
  taken = config.init_from_taken
  assert (taken.dir, taken.step, taken.unet, taken.kind) == (
      str(coco182), 0, "ema", "converted workdir")
  assert taken.class_map.unmatched == ["pole", "traffic sign"]
  assert config.first_stage.checkpoint == str(coco182 / "first_stage")


def test_live_weights_on_an_fsdp_mesh_born_sharded(coco182):
  config = _adopted(coco182, init_from_ema=False)
  state, _ = _start(config, (("data", 2), ("fsdp", 4)), sharding.FSDP)
  live = _leaves(_source_params(coco182, False)["unet"])
  ours = state.params["unet"]
  assert all(np.array_equal(np.asarray(x), live[k])
             for k, x in _leaves(ours).items())
  specs = {tuple(x.sharding.spec) for x in jax.tree.leaves(ours)}
  assert any("fsdp" in spec for spec in specs)  # split, not replicated
  kernel = ours["input_blocks_0_0"]["kernel"]
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 4


def test_class_map_file_and_none(ldm_tiny_workdir, tmp_path):
  path = tmp_path / "map.json"
  path.write_text(json.dumps({"0": 4, "1": [0, 1], "6": 2}))
  config = _adopted(ldm_tiny_workdir, "tiny", data__source="synthetic",
                    data__num_classes=7, init_class_map=str(path))
  state, _ = _start(config)
  old = _source_params(ldm_tiny_workdir, True)["cond_stage"][
      "channel_mapper"]["kernel"]
  new = np.asarray(state.params["cond_stage"]["channel_mapper"]["kernel"])
  np.testing.assert_array_equal(new[0], old[4])
  np.testing.assert_array_equal(new[6], old[2])
  np.testing.assert_allclose(new[1], (old[0] + old[1]) / 2, rtol=1e-6)
  for k in (2, 3, 4, 5):  # not in the file: the mean of all 5 rows
    np.testing.assert_allclose(new[k], old.mean(0), rtol=1e-6, atol=1e-7)
  # none: the rescaler a new run with this seed starts with.
  config = _adopted(ldm_tiny_workdir, "tiny", data__source="synthetic",
                    data__num_classes=7, init_class_map="none")
  state, optimizer = _start(config)
  fresh = ldm_step.fresh_state_fn(build.build_model(config.model), optimizer)(
      jax.random.fold_in(jax.random.key(config.seed), -1 % 2**31))
  np.testing.assert_array_equal(state.params["cond_stage"]["channel_mapper"]["kernel"],
                                fresh.params["cond_stage"]["channel_mapper"]["kernel"])


# --- what trains --------------------------------------------------------------

def test_frozen_parameters_keep_their_bits_and_have_no_optimizer_state(coco182):
  # Everything but the rescaler and the UNet's output layers trains.
  config = _adopted(coco182, train__trainable=r"^unet/(?!out_)",
                    train__base_learning_rate=1e-3, train__batch_size=2)
  state, optimizer = _start(config)
  before = _leaves(jax.device_get(state))
  ldm = build.build_model(config.model)
  step = jax.jit(ldm_step.make_train_step(ldm, optimizer, config.train))
  fs = store.load_model_dir(coco182 / "first_stage")[1]
  rs = np.random.RandomState(0)
  for _ in range(3):
    batch = {"image": rs.randint(0, 256, (2, 32, 32, 3)).astype(np.uint8),
             "labels": rs.randint(0, 19, (2, 32, 32)).astype(np.uint8)}
    state, _ = step(state, batch, fs, jax.random.key(0))
  after = _leaves(jax.device_get(state))
  frozen = re.compile(r"^(params/cond_stage/|params/unet/out_|ema/unet/out_)")
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert {k for k in before if frozen.match(k)} - {"params/cond_stage/channel_mapper/kernel"}
  assert not {k for k in changed if frozen.match(k)}
  assert all(before[k].tobytes() == after[k].tobytes()
             for k in before if frozen.match(k))
  assert "params/unet/input_blocks_0_0/kernel" in changed
  assert "ema/unet/input_blocks_0_0/kernel" in changed
  opt_paths = list(saved_shapes.leaf_shapes(state.opt_state))
  assert opt_paths and not [p for p in opt_paths
                            if "cond_stage" in p or "unet/out_" in p]
  want = trainable.frozen_paths(config.train, state.params)
  assert want == saved_shapes.stateless_params(state.params, state.opt_state)
  assert sorted(want) == ["cond_stage/channel_mapper/kernel", "unet/out_0/bias",
                          "unet/out_0/scale", "unet/out_2/bias", "unet/out_2/kernel"]


def test_presets_and_a_regex_that_trains_nothing():
  assert trainable.pattern({"trainable": "all"}) is None
  assert trainable.pattern({"trainable": "rescaler"}) == "^cond_stage/"
  params = {"unet": {"a": np.zeros(2)}, "cond_stage": {"b": np.zeros(2)}}
  assert trainable.frozen_paths({"trainable": "rescaler"}, params) == ["unet/a"]
  with pytest.raises(errors.ConfigError, match=r"train.trainable='\^unet/x' "
                     "matches no parameter; paths read like 'cond_stage/b'"):
    trainable.labels(params, "^unet/x")
  with pytest.raises(errors.ConfigError, match="is not a regex"):
    trainable.pattern({"trainable": "(unclosed"})


# --- errors in one line ---------------------------------------------------------

def test_not_a_workdir_is_one_line(coco182, tmp_path):
  for given, why in ((tmp_path / "nowhere", "no such directory"),
                     (tmp_path, "neither a workdir nor a model directory"),
                     (coco182 / "first_stage", "a model directory holding a "
                      "first stage (VQ), not a latent diffusion model: pass it "
                      "as --config.first_stage.checkpoint")):
    with pytest.raises(errors.ConfigError) as e:
      _adopted(given)
    assert str(e.value).startswith(f"init_from={given}: {why}; init_from takes "
                                   "a workdir"), str(e.value)
    assert "\n" not in str(e.value)


def test_an_architecture_other_than_the_sources_is_refused(coco182):
  key = "model.params.unet_config.params.model_channels"
  with pytest.raises(errors.ConfigError) as e:
    _adopted(coco182, overrides={key: 64})
  assert str(e.value) == (
      f"--config.{key}=64 but init_from={coco182} has {key}=32: the "
      "architecture comes from init_from (only the class count follows "
      "data.num_classes); drop the override")
  # A key the source's node lacks is set, then compared tensor by tensor.
  with pytest.raises(errors.CheckpointMismatchError) as e:
    _adopted(coco182, overrides={
        "model.params.unet_config.params.resblock_updown": True})
  assert re.fullmatch(
      rf"init_from={coco182}: unet/input_blocks_2_0/\S+ is \(.*\) there but "
      r"(\(.*\)|absent) in this run: the architectures differ in more than "
      r"the class count .*", str(e.value)), str(e.value)
  with pytest.raises(errors.ConfigError, match="brings its own first stage"):
    _adopted(coco182, overrides={"first_stage.checkpoint": "/elsewhere/vq"})


def test_a_config_json_not_describing_its_weights(coco182, tmp_path):
  copy = shutil.copytree(coco182, tmp_path / "edited")
  config = json.loads((copy / "config.json").read_text())
  config["model"]["params"]["unet_config"]["params"]["model_channels"] = 64
  (copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(errors.CheckpointMismatchError) as e:
    _adopted(copy)
  assert str(e.value) == (
      f"init_from: {copy}: checkpoints/0 params/unet/input_blocks_0_0/bias is "
      "(32,); the config builds (64,) (set by model.params.unet_config.params); "
      "its config.json does not describe these weights")


def test_class_map_file_ids_out_of_range(coco182, tmp_path):
  path = tmp_path / "map.json"
  for doc, message in (
      ({"19": 3}, "new id 19 is out of range: the new data has 19 classes "
       "(0..18)"),
      ({"2": [3, 182]}, "new id 2 -> old id 182 is out of range: the source "
       "has 182 classes (0..181)"),
      ({"x": 3}, "key 'x' is not a class id")):
    path.write_text(json.dumps(doc))
    with pytest.raises(errors.ConfigError) as e:
      _adopted(coco182, init_class_map=str(path))
    assert str(e.value) == f"init_class_map={path}: {message}"


# --- train.py -----------------------------------------------------------------

def _steps(workdir):
  ckpt = workdir / "checkpoints"
  return sorted(int(p.name) for p in ckpt.iterdir()
                if p.name.isdigit()) if ckpt.is_dir() else []


def _rows(workdir):
  path = workdir / "metrics.jsonl"
  return ([json.loads(line) for line in path.read_text().splitlines()]
          if path.is_file() else [])


@pytest.fixture(scope="module")
def finetuned(coco182, city_root, env, tmp_path_factory):
  """The 182-class model onto the 19 Cityscapes classes by name, SIGKILLed
  after a checkpoint, then the same command again: -> (workdir, the killed
  run's stdout, the steps saved when it was killed, the last step it
  logged, the second run)."""
  wd = tmp_path_factory.mktemp("finetune") / "workdir"
  cmd = [sys.executable, str(ROOT / "train.py"), "--config",
         str(ROOT / "configs/seg_f4.py:cityscapes,tiny"), "--workdir", str(wd),
         f"--config.init_from={coco182}", f"--config.data.root={city_root}",
         "--config.train.steps=40", "--config.train.checkpoint_every=5",
         "--config.train.warmup_steps=10", "--config.train.sample_every=0"]
  with open(wd.parent / "out1", "w") as out:
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    saved, rows = _steps(wd), _rows(wd)
    if saved and rows and rows[-1]["step"] > saved[-1]:
      break
    time.sleep(0.02)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at, saved = _rows(wd)[-1]["step"], _steps(wd)
  again = subprocess.run(cmd, env=env, capture_output=True, text=True,
                         timeout=600)
  return wd, (wd.parent / "out1").read_text(), saved, killed_at, again


def test_cityscapes_fine_tune_prints_its_map_and_resumes_after_sigkill(
    coco182, finetuned):
  wd, printed, saved, killed_at, r = finetuned
  assert saved[-1] < killed_at < 40
  assert printed.startswith(f"init_from {coco182}: converted workdir, step 0, "
                            "EMA UNet weights")
  assert "17 of 19 matched" in printed
  for new, old in CITYSCAPES_FROM_COCO.items():
    if old:
      assert re.search(rf"(^  |; ){new} <- {old[0]}( \(|;|$)", printed,
                       re.M), (new, printed)
  assert "    pole: no class of that name" in printed
  assert "    traffic sign: 'street sign' is a coco-stuff class" in printed

  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith(f"init_from: {wd} has checkpoints: resuming from "
                             "them as any run does; init_from=")
  assert f"resuming from step {saved[-1]}" in r.stderr
  assert json.loads(r.stdout.strip().splitlines()[-1])["checkpoint"] == 40
  rows = _rows(wd)
  assert [row["step"] for row in rows] == list(range(1, 41))
  assert all(np.isfinite(row["loss"]) for row in rows)
  assert rows[0]["lr"] == pytest.approx(0.0) and rows[10]["lr"] > rows[4]["lr"]
  config = json.loads((wd / "config.json").read_text())
  assert config["init_from_taken"]["class_map"]["matched"] == 17
  assert config["model"]["params"]["cond_stage_config"]["params"]["in_channels"] == 19
  assert store.restore_meta(wd, 40)["frozen"] == []


def test_a_workdir_trained_here_is_a_source_too(finetuned, capsys):
  """The fine-tuned Cityscapes run onto ADE20K's 150 classes, by name."""
  wd = finetuned[0]
  config = _adopted(wd, "ade20k,tiny")
  assert "init_from " + str(wd) + ": workdir, step 40, EMA UNet weights" in (
      capsys.readouterr().out)
  state, _ = _start(config)
  theirs = jax.device_get(store.restore_params(
      wd, build.build_model(run_config.load(wd).model))[0])
  ade_names = class_names.class_set({"num_classes": 150}).names
  city_names = class_names.class_set({"num_classes": 19,
                                      "dataset": "cityscapes"}).names
  new = np.asarray(state.params["cond_stage"]["channel_mapper"]["kernel"])
  old = theirs["cond_stage"]["channel_mapper"]["kernel"]
  for a, c in (("road", "road"), ("sky", "sky"), ("pole", "pole"),
               ("traffic", "traffic light"), ("tree", "vegetation")):
    np.testing.assert_array_equal(new[ade_names.index(a)],
                                  old[city_names.index(c)])
  np.testing.assert_array_equal(new[ade_names.index("bed")],
                                old.astype(np.float64).mean(0).astype(np.float32))
  assert all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(state.params["unet"]), jax.tree.leaves(theirs["unet"])))


def test_a_source_without_ema_gives_its_live_weights(coco182, tmp_path, capsys):
  live = _source_params(coco182, False)
  noema = store.save_converted_workdir(
      tmp_path / "noema", {"model": run_config.load(coco182).model.to_dict(),
                           "first_stage": {"checkpoint": str(coco182 / "first_stage")}},
      7, live, None, {"global_step": 7})
  config = _adopted(noema)
  assert (f"init_from {noema}: converted workdir, step 7, live UNet weights (it "
          f"saved no EMA), first stage {coco182 / 'first_stage'}") in (
              capsys.readouterr().out)
  state, _ = _start(config)
  assert all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(state.params["unet"]), jax.tree.leaves(live["unet"])))


def test_a_unet_model_directory(tmp_path, capsys):
  """A converted UNet alone: its UNet; the rescaler and first stage are the
  config's, as in a new run."""
  import convert_torch_ckpt  # pylint: disable=g-import-not-at-top
  fixtures = ROOT / "tests" / "fixtures"
  for name in ("unet_tiny", "rescaler"):
    assert convert_torch_ckpt.main([
        str(fixtures / f"{name}.ckpt"), "--config",
        str(fixtures / f"{name}.yaml"), "--out", str(tmp_path / name)]) == 0
  capsys.readouterr()
  config = _adopted(tmp_path / "unet_tiny", "tiny", data__source="synthetic",
                    data__num_classes=7, first_stage__allow_random_init=True)
  assert capsys.readouterr().out.startswith(
      f"init_from {tmp_path / 'unet_tiny'}: UNet model directory, its UNet "
      "weights; the rescaler starts from random weights")
  assert list(config.model.params.unet_config.params.channel_mult) == [1, 2]
  state, optimizer = _start(config)
  _, unet, _ = store.load_model_dir(tmp_path / "unet_tiny")
  assert all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(state.params["unet"]), jax.tree.leaves(unet)))
  fresh = ldm_step.fresh_state_fn(build.build_model(config.model), optimizer)(
      jax.random.fold_in(jax.random.key(config.seed), -1 % 2**31))
  np.testing.assert_array_equal(
      state.params["cond_stage"]["channel_mapper"]["kernel"],
      fresh.params["cond_stage"]["channel_mapper"]["kernel"])
  with pytest.raises(errors.ConfigError, match="a model directory holding a "
                     "ldm.modules.encoders.modules.SpatialRescaler alone"):
    _adopted(tmp_path / "rescaler", "tiny", data__source="synthetic")
