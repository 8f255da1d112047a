"""The launches that ``tests/test_cluster.py`` checks, as users make them, in one script.

    python tests/cluster_run.py ROOT

1. ``alp-train --config=digits_alp`` with its periodic settings as shipped (log and
   summaries with images every 50 steps, a checkpoint every 200, three kept) on two
   processes of one CPU device each (gloo on 127.0.0.1), only the steps, the image size and
   the output directory changed, with a continuous ``alp-eval --train_dir`` beside it;
2. then ``alp-eval`` as a two-process cluster on the final checkpoint;
3. then ``alp-robustness`` as a two-process cluster, and as one process, on it.

Each phase's exit statuses and output go to ``ROOT/phases.json`` (written atomically at the
end); ``ROOT/run`` is the training run, ``ROOT/multi`` and ``ROOT/single`` the robustness
outputs. The run is mostly gloo round trips (one CPU core in four busy), so ``conftest.py``
starts this script in the background as soon as a test run has collected test_cluster.py,
which then runs last and only reads what it wrote (``wait``); run alone, the module fixture
calls ``run`` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from helpers import free_port, program_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = "ALP_JAX_TEST_CLUSTER_RUN"  # the background run's ROOT, set by conftest.py
STEPS = 601
SHIPPED = ["--config=digits_alp", f"--config.max_steps={STEPS}",
           "--config.dataset_image_size=8"]
ROBUSTNESS = ["--attacks=pgdrnd_16_4_2,square_16_20", "--eps=8,16",
              "--num_examples=40", "--eval_batch_size=32",
              "--large_eps_attack=pgdrnd_128_32_2", "--num_images=2"]
TIMEOUT = 900  # seconds, for each phase


def _start(module: str, *args: str, devices: int = 1) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO,
                            env=program_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _cluster(module: str, *args: str) -> list[subprocess.Popen]:
    port = free_port()
    return [_start(module, *args, f"--coordinator_address=127.0.0.1:{port}",
                   "--num_processes=2", f"--process_id={i}", "--distributed_timeout_s=300")
            for i in range(2)]


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(status, output) of each process; every process is ended by the time this returns."""
    deadline = time.time() + TIMEOUT
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.time()))[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outs, strict=True)]


def run(root: str) -> dict[str, list[tuple[int, str]]]:
    """Every phase, in order; returns (and writes to ``ROOT/phases.json``) their results.
    A later phase runs even when an earlier one failed: each test reports its own."""
    out = os.path.join(root, "run")
    train = _cluster("alp_jax.train", *SHIPPED, f"--output_dir={out}")
    deadline = time.time() + 300
    while not os.path.isdir(out) and time.time() < deadline and train[0].poll() is None:
        time.sleep(0.2)
    evaluator = _start("alp_jax.eval", f"--train_dir={out}", "--eval_interval_secs=0")
    *trained, beside = _finish([*train, evaluator])
    phases = {"train": trained, "eval_beside": [beside],
              "eval_cluster": _finish(_cluster("alp_jax.eval", f"--checkpoint_path={out}"))}
    phases["robustness_cluster"] = _finish(_cluster(
        "alp_jax.robustness", f"--checkpoint_path={out}", *ROBUSTNESS,
        f"--output_dir={os.path.join(root, 'multi')}"))
    phases["robustness_single"] = _finish([_start(
        "alp_jax.robustness", f"--checkpoint_path={out}", *ROBUSTNESS,
        f"--output_dir={os.path.join(root, 'single')}")])
    tmp = os.path.join(root, "phases.json.tmp")
    with open(tmp, "w") as f:
        json.dump(phases, f)
    os.replace(tmp, os.path.join(root, "phases.json"))
    return phases


def start_in_background(root: str) -> subprocess.Popen:
    """``python tests/cluster_run.py ROOT`` as its own process group (so that the test run
    can end it and everything it started), its own output in ``ROOT/driver.log``."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "driver.log"), "w") as log:
        return subprocess.Popen([sys.executable, os.path.abspath(__file__), root], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait(root: str, timeout_s: float) -> dict[str, list[tuple[int, str]]]:
    """The phases of the background run in ``root``, once it has written them."""
    path, deadline = os.path.join(root, "phases.json"), time.time() + timeout_s
    while not os.path.exists(path):
        if os.path.exists(os.path.join(root, "failed")) or time.time() > deadline:
            log = open(os.path.join(root, "driver.log")).read()[-3000:]
            raise RuntimeError(f"the background cluster run in {root} wrote no results "
                               f"(waited up to {timeout_s:.0f} s); its output:\n{log}")
        time.sleep(1)
    with open(path) as f:
        return {k: [tuple(x) for x in v] for k, v in json.load(f).items()}


if __name__ == "__main__":
    try:
        run(sys.argv[1])
    except BaseException:
        open(os.path.join(sys.argv[1], "failed"), "w").close()  # wait() stops at once
        raise
