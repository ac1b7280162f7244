"""A multi-process run that loses a process, or gets a preemption notice.

2 processes x 2 CPU devices on localhost train the tiny recipe. SIGTERM to
one of them: both save the same step and exit 0, and the rerun resumes
there. SIGKILL to one after a checkpoint: the other exits non-zero within
`parallel.heartbeat_timeout_s` + 10 s, its last stderr line saying which
process stopped, the last complete checkpoint and the command to resume;
the rerun resumes from that checkpoint. Losing process 0 (the coordinator)
is reported the same way, by idle processes (no training: cheap).
"""

import re
import signal
import subprocess
import sys
import time

from segldm_jax import metrics
from segldm_jax import parallel

from test_multiprocess import ARGS, ROOT, _env, _free_port  # pylint: disable=g-bad-import-order

HEARTBEAT_S = 5
EXTRA = ["--config.train.sample_every=0", "--config.train.checkpoint_every=2",
         f"--config.parallel.heartbeat_timeout_s={HEARTBEAT_S}"]


def _start(workdir, steps, cache, tag):
  port = _free_port()
  cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, *EXTRA,
         f"--workdir={workdir}", f"--config.train.steps={steps}",
         f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs, logs = [], []
  for i in range(2):
    out = workdir.parent / f"{tag}.{i}.out"
    err = workdir.parent / f"{tag}.{i}.err"
    logs.append((out, err))
    procs.append(subprocess.Popen([*cmd, f"--process_id={i}"],
                                  env=_env(2, cache), stdout=out.open("w"),
                                  stderr=err.open("w")))
  return procs, logs


def _wait_for_step(workdir, procs, past: int, timeout=600) -> int:
  """Waits until a checkpoint newer than `past` is complete; -> its step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    step = parallel.last_complete_step(workdir / "checkpoints")
    if step is not None and step > past:
      return step
    assert all(p.poll() is None for p in procs), "a process ended early"
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint past step {past} in {timeout} s")


def _finish(procs, logs, timeout=600):
  for p in procs:
    p.wait(timeout=timeout)
  return [p.returncode for p in procs], [e.read_text() for _, e in logs]


def test_preemption_and_a_lost_process(tmp_path):
  workdir, cache = tmp_path / "run", tmp_path / "xla"

  # 1. SIGTERM to process 1 only: both stop at the same step, save it and
  #    exit 0.
  procs, logs = _start(workdir, 1000, cache, "term")
  first = _wait_for_step(workdir, procs, 0)
  procs[1].send_signal(signal.SIGTERM)
  codes, errs = _finish(procs, logs)
  assert codes == [0, 0], errs
  saved = [int(re.search(r"signal 15: saving step (\d+)", e).group(1))
           for e in errs]
  assert saved[0] == saved[1] >= first, errs
  stopped = saved[0]
  assert parallel.last_complete_step(workdir / "checkpoints") == stopped

  # 2. The rerun resumes there; SIGKILL process 1 after its next checkpoint.
  procs, logs = _start(workdir, 1000, cache, "kill")
  kept = _wait_for_step(workdir, procs, stopped)
  procs[1].kill()
  killed = time.monotonic()
  procs[0].wait(timeout=HEARTBEAT_S + 60)
  waited = time.monotonic() - killed
  print(f"SIGTERM: both saved step {stopped}; SIGKILL after step {kept}: "
        f"the survivor exited {waited:.1f} s later")  # pytest -s
  err = logs[0][1].read_text()
  assert f"resuming from step {stopped}" in err
  assert procs[0].returncode not in (0, None), err[-3000:]
  assert waited < HEARTBEAT_S + 10, (waited, err[-3000:])
  last = err.strip().splitlines()[-1]
  latest = parallel.last_complete_step(workdir / "checkpoints")
  assert latest >= kept
  assert re.fullmatch(
      rf"error: process 1 of 2 stopped \(no heartbeat for {HEARTBEAT_S} s: "
      r"lost host, killed or crashed\); the last complete checkpoint is step "
      rf"{latest} in {workdir}/checkpoints; resume by re-running every "
      rf"process's command, this one's: python .*train\.py .*"
      rf"--workdir={workdir} .*--process_id=0",
      last), last

  # 3. The rerun resumes from the last complete checkpoint and finishes.
  procs, logs = _start(workdir, latest + 1, cache, "resume")
  codes, errs = _finish(procs, logs)
  assert codes == [0, 0], [e[-3000:] for e in errs]
  assert f"resuming from step {latest}" in errs[0]
  steps = [r["step"] for r in metrics.read_jsonl(workdir / "metrics.jsonl")]
  assert steps == list(range(1, latest + 2))


_IDLE = """
import sys, time
from segldm_jax import parallel
port, me, workdir = sys.argv[1:4]
parallel.maybe_initialize_distributed(f"localhost:{port}", 2, int(me),
                                      heartbeat_timeout_s=3)
parallel.watch_peers(3, f"{workdir}/checkpoints")
print("ready", flush=True)
while True:
  time.sleep(0.1)
"""


def test_a_lost_coordinator_is_reported_by_the_others(tmp_path):
  # jax aborts the others at once when process 0 goes (exit 134, its own
  # fatal error); the helper of watch_peers still has the last word.
  (tmp_path / "checkpoints" / "7").mkdir(parents=True)
  port = _free_port()
  env = {**_env(1, tmp_path / "xla"), "PYTHONPATH": str(ROOT)}
  errs = [tmp_path / f"{i}.err" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", _IDLE, str(port), str(i),
                             str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=errs[i].open("w"), text=True)
           for i in range(2)]
  try:
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
    procs[0].kill()
    procs[1].wait(timeout=3 + 10)
  finally:
    for p in procs:
      p.kill()
  assert procs[1].returncode not in (0, None)
  deadline = time.monotonic() + 10  # the helper writes once it is gone
  while "coordinator" not in errs[1].read_text() and time.monotonic() < deadline:
    time.sleep(0.1)
  last = errs[1].read_text().strip().splitlines()[-1]
  assert last.startswith(
      "error: process 0 (the coordinator) of 2 stopped (lost host, killed or "
      f"crashed); the last complete checkpoint is step 7 in {tmp_path}/"
      "checkpoints; resume by re-running every process's command, this "
      "one's: python "), last
