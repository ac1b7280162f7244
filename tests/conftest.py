"""Shared pytest setup: CPU only, deterministic, paths to the fixture folder.

One persistent XLA compilation cache for the whole session, the train.py and
sample.py subprocesses included: many tests run the same tiny recipe, and a
program loaded from the cache is the very program compiled before, so it
saves minutes of compiling without changing a single result.
"""
import atexit
import multiprocessing.process
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# train.py and sample.py keep compiled programs in $XDG_CACHE_HOME
# (segldm_jax/compilation_cache.py): never the user's, in tests.
_CACHE_HOME = tempfile.mkdtemp(prefix="segldm_test_cache_")
os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
atexit.register(shutil.rmtree, _CACHE_HOME, ignore_errors=True)
# 8 host devices so sharding tests run on CPU; must be set before jax loads.
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _XLA_FLAGS:
  os.environ["XLA_FLAGS"] = (_XLA_FLAGS
                             + " --xla_force_host_platform_device_count=8")

# `make test-fast` keeps that cache between runs (SEGLDM_TEST_XLA_CACHE, a
# folder in the venv): compiling is most of the inner loop's time, and a
# rerun then compiles only the programs an edit changed (jax keys each by
# its HLO, flags and versions). Emptied once it outgrows _KEPT_CACHE_BYTES
# (jax's own size limit needs the filelock package). Otherwise the cache
# lives for this session only. xdist's workers inherit the controller's.
_KEPT_CACHE_BYTES = 2 << 30


def _session_cache_dir() -> str:
  kept = os.environ.get("SEGLDM_TEST_XLA_CACHE")
  if not kept:
    fresh = tempfile.mkdtemp(prefix="segldm_test_xla_cache_")
    atexit.register(shutil.rmtree, fresh, ignore_errors=True)
    return fresh
  kept = pathlib.Path(kept)
  if kept.is_dir() and sum(f.stat().st_size for f in kept.rglob("*")
                           if f.is_file()) > _KEPT_CACHE_BYTES:
    shutil.rmtree(kept, ignore_errors=True)
  kept.mkdir(parents=True, exist_ok=True)
  return str(kept)


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _session_cache_dir()
  # Every program, as train.py keeps them (runtime/compilation_cache.py): a
  # rerun of the fast tier read back its ~100 large programs but compiled
  # ~1,300 small ones again, 85 s of its workers' time against ~30 s to
  # read them back.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

from segldm_jax.runtime import xla_cpu  # pylint: disable=g-import-not-at-top

xla_cpu.use_xnnpack_convolutions()  # the numerics train.py and sample.py get

import pytest  # pylint: disable=g-import-not-at-top

TESTS_DIR = pathlib.Path(__file__).parent
# The suite's time budget on a 2-core CPU: `make test` (venv build included)
# must finish within 15 minutes in CI, so new features fit their tests in
# what is left. The ten slowest tests are printed after every run.
SUITE_BUDGET_S = 780
# `make test-fast` (`-m "not slow"`, below): the inner loop, on the same CPU.
FAST_BUDGET_S = 180
_START = time.monotonic()


def pytest_terminal_summary(terminalreporter):
  elapsed = time.monotonic() - _START
  fast = terminalreporter.config.getoption("markexpr") == "not slow"
  budget = FAST_BUDGET_S if fast else SUITE_BUDGET_S
  verdict = "within" if elapsed <= budget else "OVER"
  terminalreporter.write_line(
      f"{'fast ' if fast else ''}suite time {elapsed:.0f} s, {verdict} the "
      f"{budget} s budget (tests/conftest.py)")


# `make test` runs `-n 2 --dist loadfile`: xdist hands out whole files, by
# default those with the most tests first, which left the few-test files that
# each run several train.py processes for the end, one worker busy while the
# other waited. These go first instead (longest first), the rest follow in
# collection order and fill in. Rank by `--durations=0` when a file grows.
SLOW_FILES_FIRST = (
    "test_train_e2e.py", "test_multiprocess.py", "test_datasets.py",
    "test_init_from.py", "test_sharded_training.py", "test_guidance_edit_tiles.py",
    "test_benchmarks.py", "test_ldm_training.py", "test_remat.py",
    "test_serve_browser.py", "test_serve_api.py",
    "test_vq_training.py", "test_config_errors.py", "test_data_robustness.py",
)


# `make test-fast` runs `-m "not slow"`: the slow tests are those that start
# a process (one of the repository's scripts, serve.py, `python -c` for a
# fresh interpreter, several processes at once) or train end to end. Marked
# here, by file or by test, not in each file. Unmarked tests run in-process
# only: `_refuse_processes` below fails one that starts a process, and
# tests/test_slow_marks.py checks that the names exist.
SLOW_FILES = (
    "test_train_e2e.py",      # train.py / sample.py processes, kills, resumes
    "test_multiprocess.py",   # 2 train.py processes x 4 devices, lost peers
    "test_serve_browser.py",  # serve.py as a process, driven by Chromium
    "test_serve_load.py",     # serve.py as a process under load
)
SLOW_TESTS = {  # file -> tests (names without parameters)
    "test_datasets.py": {  # 4 train.py runs
        "test_each_variant_trains_three_steps",
        "test_reference_recipe_trains_on_sflckr_folders"},
    "test_data_robustness.py": {  # train.py
        "test_train_check_data_flag",
        "test_train_skip_mode_finishes_and_counts_in_metrics"},
    "test_config_errors.py": {  # train.py; a save that fills the disk
        "test_train_py_reports_an_unknown_key_in_one_line",
        "test_failed_background_save_ends_the_run_in_one_line"},
    "test_hostile_checkpoints.py": {  # convert_torch_ckpt.py as a process
        "test_real_cli_process_exits_1_with_one_line"},
    "test_no_torch.py": {  # the scripts imported and the LDM converted in a
        "test_product_runs_without_torch"},  # process that blocks torch
    "test_parallel.py": {  # 2 processes
        "test_an_error_in_one_process_ends_both_at_once"},
    "test_benchmarks.py": {  # benchmarks/bench.py
        "test_benchmark_smoke_run_reports_flops_and_memory"},
    "test_init_from.py": {  # train.py fine-tunes (the `finetuned` fixture)
        "test_cityscapes_fine_tune_prints_its_map_and_resumes_after_sigkill",
        "test_a_workdir_trained_here_is_a_source_too"},
    # A fresh interpreter: what one import loads, the user's cache folder, a
    # checkpoint's pages that a new process maps, the API outside the repo.
    "test_architecture.py": {"test_sampling_loads_no_training_code"},
    "test_compilation_cache.py": {
        "test_default_folder_is_in_the_user_cache_and_a_recompile_hits",
        "test_a_config_folder_moves_it_and_empty_turns_it_off"},
    "test_torch_io.py": {"test_large_checkpoint_is_memory_mapped"},
    "test_painted_masks.py": {"test_load_and_sample_from_outside_the_repo"},
    "test_data.py": {  # grain's worker processes
        "test_state_restore_gives_identical_next_batches[2]"},
}


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # xdist loaded
    config.option.loadscopereorder = False


def _is_slow(item) -> bool:
  name = item.path.name
  marked = SLOW_TESTS.get(name, ())
  return (name in SLOW_FILES or item.originalname in marked
          or item.name in marked)  # one parameter of a test: "test_x[2]"


def _refuse_processes(item):
  """Wraps one test's setup or call: outside the slow tier, starting a
  process fails the test, so the tier's definition holds by itself."""
  if item.get_closest_marker("slow"):
    yield
    return
  popen, start = subprocess.Popen, multiprocessing.process.BaseProcess.start

  def refused(what):
    raise AssertionError(
        f"{item.nodeid} starts a process ({str(what)[:80]}): make it an "
        "in-process test or mark it slow (SLOW_TESTS in tests/conftest.py)")

  subprocess.Popen = lambda args, *_, **__: refused(args)
  multiprocessing.process.BaseProcess.start = refused  # data loader workers
  try:
    yield
  finally:
    subprocess.Popen, multiprocessing.process.BaseProcess.start = popen, start


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):  # session and module fixtures included
  yield from _refuse_processes(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
  yield from _refuse_processes(item)


def pytest_collection_modifyitems(items):
  for item in items:
    if _is_slow(item):
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("SEGLDM_FIXTURES", TESTS_DIR / "fixtures"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
  return TESTS_DIR / "data"


@pytest.fixture(scope="session")
def ldm_tiny_workdir(tmp_path_factory) -> pathlib.Path:
  """The reference's ldm_tiny checkpoint converted into a workdir, as users
  convert a released model (32x32 images, 5 classes, real weights)."""
  import convert_torch_ckpt  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("converted") / "ldm_tiny"
  assert convert_torch_ckpt.main([
      str(TESTS_DIR / "fixtures" / "ldm_tiny.ckpt"), "--config",
      str(TESTS_DIR / "fixtures" / "ldm_tiny.yaml"), "--out", str(out)]) == 0
  return out
