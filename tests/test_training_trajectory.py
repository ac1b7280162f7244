"""Training dynamics against the original: recorded PyTorch steps, replayed.

Each case in `tests/fixtures/trajectory` (or the folder named by
SEGLDM_TRAJECTORY_FIXTURES) is NAME.yaml + NAME.ckpt + NAME.npz: the initial
weights, and per optimiser step k the batch (`x[k]`, `mask_labels[k]`), the
timesteps and noise the original drew (`t[k]`, `noise[k]`) and its loss
(`loss[k]`), then every trainable tensor and EMA buffer after the last step
(`final/NAME`, `final_ema/NAME`, torch state_dict names). Nothing here knows a
case's name or size, so a new case in this format is tested as dropped in.

The replay takes the path train.py takes to fine-tune a converted checkpoint:
our converter, the workdir convert_torch_ckpt.py writes, the train state
restored from it, then the real jitted train step with t and noise pinned.
The optimiser is the product's default AdamW at the YAML's
`base_learning_rate` (used as is: the case did not scale it).

Tolerances (fixtures README): PyTorch against itself with another thread
count moves the losses by 2.3e-5 relative and the update `final - init` by
0.5% of its norm (EMA 0.4%); AdamW turns tiny gradients into +-lr steps, so
single elements can flip and only the norm over all tensors is compared.
"""

import os
import pathlib

import jax
import numpy as np
import pytest
import yaml

from segldm_jax import convert
from segldm_jax.checkpoint import saved_shapes
from segldm_jax.checkpoint import store
from segldm_jax.convert import torch_io
from segldm_jax.training import ldm_step

FIXTURES = pathlib.Path(os.environ.get(
    "SEGLDM_TRAJECTORY_FIXTURES",
    pathlib.Path(__file__).parent / "fixtures" / "trajectory"))
LOSS_RTOL = 2e-4      # 9x PyTorch's own thread-count drift
UPDATE_RTOL = 0.02    # 4x PyTorch's own thread-count drift
COUNTER = "model_ema.num_updates"


def _cases() -> list[str]:
  return sorted(p.stem for p in FIXTURES.glob("*.yaml")
                if p.with_suffix(".ckpt").exists() and p.with_suffix(".npz").exists())


def _nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1))


def _torch_names(params, ema) -> tuple[dict, dict]:
  """Our trained tensors and EMA under the reference's state_dict names."""
  live = {}
  for part, kind in (("unet", "unet"), ("cond_stage", "rescaler")):
    live.update({convert.LDM_PREFIXES[part] + k: v for k, v in
                 convert.to_torch_state_dict(params[part], kind).items()})
  shadow = {convert.ema_key(k): v for k, v in
            convert.to_torch_state_dict(ema["unet"], "unet").items()}
  return live, shadow


def _restore(mgr, step, optimizer, param_shapes):
  abstract = jax.eval_shape(
      lambda p: ldm_step.init_state(p, optimizer), param_shapes)
  here = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: here, abstract)
  # Placed like the restored arrays (as train.py does), so that the step
  # compiles once, not again when its outputs come back committed.
  init_opt = jax.jit(optimizer.init, out_shardings=shardings.opt_state)
  return store.restore_train_state(mgr, step, abstract, shardings,
                                         init_opt)


@pytest.fixture(scope="module", params=_cases() or ["(none)"])
def replay(request, tmp_path_factory):
  """-> what the replay saw and ended with, for one case."""
  name = request.param
  if name == "(none)":
    pytest.fail(f"no trajectory cases (NAME.yaml/.ckpt/.npz) in {FIXTURES}")
  ref = dict(np.load(FIXTURES / f"{name}.npz"))
  initial = torch_io.load_state_dict(FIXTURES / f"{name}.ckpt")
  conv = convert.convert_checkpoint(FIXTURES / f"{name}.ckpt",
                                    FIXTURES / f"{name}.yaml")
  ldm = conv.model
  workdir = tmp_path_factory.mktemp(name)
  global_step = int(conv.meta.get("global_step", 0))
  store.save_converted_workdir(
      workdir, {"model": conv.node}, global_step,
      {k: conv.params[k] for k in ("unet", "cond_stage")}, conv.ema, conv.meta)

  recipe = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())["model"]
  steps, batch_size = ref["x"].shape[:2]
  train_cfg = {"base_learning_rate": recipe["base_learning_rate"],
               "scale_lr": False, "batch_size": batch_size}
  optimizer = ldm_step.make_optimizer(train_cfg)
  param_shapes = saved_shapes.ldm_param_shapes(ldm)
  with store.checkpoint_manager(workdir) as mgr:
    resume_from = store.resume_step(mgr)  # train.py's choice
    state = _restore(mgr, global_step, optimizer, param_shapes)
  restored_counter = int(state.ema_updates)
  restored_ema = jax.tree.map(np.asarray, state.ema)

  # Images go in as pixel values, the step's input (float: no rounding).
  # Labels smaller than the images stand for data.mask_size (none here).
  mask_stages = int(np.log2(ref["x"].shape[-1] // ref["mask_labels"].shape[-1]))
  step_fn = jax.jit(ldm_step.make_train_step(ldm, optimizer, train_cfg,
                                                 mask_stages))
  losses = []
  for k in range(steps):
    batch = {"image": _nhwc(ref["x"][k]) * 127.5 + 127.5,
             "labels": ref["mask_labels"][k].astype(np.int32),
             "pinned": {"t": ref["t"][k], "noise": _nhwc(ref["noise"][k])}}
    state, metrics = step_fn(state, batch, conv.params["first_stage"],
                             jax.random.key(0))
    losses.append(float(metrics["loss"]))

  # Saved and resumed as train.py does between runs.
  with store.checkpoint_manager(workdir) as mgr:
    store.save_train_state(mgr, global_step + steps, state)
    mgr.wait_until_finished()
    resumed = _restore(mgr, global_step + steps, optimizer, param_shapes)
  return {"ref": ref, "initial": initial, "conv": conv, "losses": losses,
          "global_step": global_step, "resume_from": resume_from,
          "state": state, "resumed": resumed,
          "restored_counter": restored_counter, "restored_ema": restored_ema}


def _update_error(ours: dict, ref: dict, initial: dict, prefix: str) -> float:
  """||(ours - init) - (ref - init)|| / ||ref - init|| over every tensor
  the reference saved under `prefix` (float64 sums)."""
  names = sorted(k[len(prefix):] for k in ref
                 if k.startswith(prefix) and k != prefix + COUNTER)
  assert sorted(ours) == names, "our trained tensors are not the reference's"
  diff = sum(np.sum((np.asarray(ours[n], np.float64) - ref[prefix + n]) ** 2)
             for n in names)
  step = sum(np.sum((np.asarray(ref[prefix + n], np.float64) - initial[n]) ** 2)
             for n in names)
  return float(np.sqrt(diff / step))


def test_losses_match_every_step(replay):
  ref_loss = replay["ref"]["loss"]
  rel = np.abs(np.asarray(replay["losses"]) / ref_loss - 1.0)
  assert len(replay["losses"]) == len(ref_loss)
  assert rel.max() <= LOSS_RTOL, f"relative loss errors per step: {rel}"


def test_trained_tensors_land_where_pytorch_lands(replay):
  live, _ = _torch_names(replay["state"].params, replay["state"].ema)
  err = _update_error(live, replay["ref"], replay["initial"], "final/")
  assert err <= UPDATE_RTOL, f"update differs by {err:.2%} of its norm"


def test_ema_lands_where_pytorch_lands(replay):
  _, shadow = _torch_names(replay["state"].params, replay["state"].ema)
  err = _update_error(shadow, replay["ref"], replay["initial"], "final_ema/")
  assert err <= UPDATE_RTOL, f"EMA update differs by {err:.2%} of its norm"


def test_ema_counter_ends_at_the_references(replay):
  assert (int(replay["state"].ema_updates)
          == int(replay["ref"][f"final_ema/{COUNTER}"]))


def test_resuming_a_converted_checkpoint_keeps_the_ema(replay):
  """The checkpoint's LitEma counter and shadow weights survive conversion
  and the restore train.py does (warm-up continues, not restarts); and a
  saved train state resumes with the count it reached. A workdir at step 0
  (a file Lightning never stepped) is resumed too, not re-initialised."""
  assert replay["resume_from"] == replay["global_step"]
  assert replay["restored_counter"] == int(replay["initial"][COUNTER])
  restored = jax.tree.leaves(replay["restored_ema"])
  converted = jax.tree.leaves(replay["conv"].ema)
  assert len(restored) == len(converted)
  for a, b in zip(restored, converted):
    np.testing.assert_array_equal(a, b)
  state, resumed = replay["state"], replay["resumed"]
  assert int(resumed.ema_updates) == int(state.ema_updates)
  for a, b in zip(jax.tree.leaves(resumed.ema), jax.tree.leaves(state.ema)):
    np.testing.assert_array_equal(a, b)



def test_optimizer_is_torch_adamw_with_its_defaults():
  """What ten recorded steps cannot see: weight decay moves each weight by
  lr x wd x steps = 1e-4 of itself, under PyTorch's own 0.5% drift. Twenty
  steps against torch.optim.AdamW's documented update at its defaults
  (betas 0.9 / 0.999, eps 1e-8, weight decay 0.01), on weights large enough
  for the decay to show (~5e-5 a step) and gradients small enough for eps to
  (up to half a step), with atol a hundredth of lr (float32 round-off of
  weights ~5 is < 5e-7 a step)."""
  lr, wd, b1, b2, eps = 1e-3, 0.01, 0.9, 0.999, 1e-8
  optimizer = ldm_step.make_optimizer(
      {"base_learning_rate": lr, "scale_lr": False, "batch_size": 4})
  rs = np.random.RandomState(0)
  params = {"unet": {"w": rs.normal(0, 5, (64,)).astype(np.float32)},
            "cond_stage": {"k": rs.normal(0, 5, (8, 3)).astype(np.float32)}}
  opt_state = optimizer.init(params)
  ref = jax.tree.map(lambda p: p.astype(np.float64), params)
  m = jax.tree.map(np.zeros_like, ref)
  v = jax.tree.map(np.zeros_like, ref)
  for k in range(1, 21):
    grads = jax.tree.map(lambda p: (rs.normal(0, 1e-8, p.shape) * rs.choice(
        [1, 1e6], p.shape)).astype(np.float32), params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: np.asarray(p + u), params, updates)
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * np.square(g, dtype=np.float64),
                     v, grads)
    ref = jax.tree.map(lambda p, m, v: p * (1 - lr * wd) - lr * (
        m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps), ref, m, v)
  for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=lr / 100)
