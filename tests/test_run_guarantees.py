"""What a training run guarantees (issue 15): no lost work, no wrong state carried on.

Each test reproduces one way a run used to lose work or continue from the wrong state:
``keep_checkpoints=0``, two runs in one directory, non-finite weights saved, resuming
another run's directory, damaged checkpoints, SIGTERM during the final save, preemption
and a cluster that never forms (lost processes: test_cluster_faults.py), a full disk.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import helpers
import jax
import numpy as np
import optax
import pytest
from helpers import cluster_priority, free_port, program_env

from alp_jax import checkpoints, configs, run_dir
from alp_jax import train as train_lib
from alp_jax import train_state as ts
from alp_jax.config import resolve_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALP = "digits_alp"  # shipped configs (alp_jax/configs/digits.py:alp), by name
BASELINE = "digits_baseline"
# A tiny clean run: 8x8 digits, batch 16 (the attack is not what these tests are about).
TINY = ["--config.dataset_image_size=8", "--config.batch_size=16",
        "--config.eval_batch_size=32", "--config.log_every_steps=2",
        # Summaries every 2 steps write metrics.jsonl, which tells a test that steps run.
        "--config.save_summaries_steps=2", "--config.num_summary_images=0",
        "--hparams=train_adv_method=clean"]


def tiny_config(output_dir: str, name: str = ALP, **overrides):
    cfg = resolve_config(configs.get_config(name))
    cfg.dataset_image_size = 8
    cfg.batch_size = 16
    cfg.train_adv_method = "clean"
    cfg.output_dir = output_dir
    cfg.log_every_steps = 2
    cfg.save_summaries_steps = 0
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def run_train(*args: str, timeout: int = 300, devices: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alp_jax.train", *args], cwd=REPO,
                          env=program_env(devices), capture_output=True, text=True, timeout=timeout)


def start_train(*args: str, devices: int = 1, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alp_jax.train", *args], cwd=REPO,
                            env=program_env(devices), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _damage(step_dir: str, nbytes: int = 64) -> str:
    """Flips ``nbytes`` bytes in the middle of the largest file of the step's state."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f)]
    target = max(files, key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    for i in range(nbytes):
        data[len(data) // 2 + 7 * i] ^= 0xFF
    open(target, "wb").write(bytes(data))
    return target


# ---- 1. keep_checkpoints=0 ------------------------------------------------------------

def test_keep_checkpoints_zero_keeps_every_checkpoint(tmp_path):
    # It used to delete every checkpoint and report success; in the original 0 kept all.
    out = str(tmp_path / "run")
    train_lib.train(tiny_config(out, max_steps=6, save_model_steps=2, keep_checkpoints=0))
    assert checkpoints.steps(out) == [2, 4, 6]


# ---- 2. one writer per output directory -------------------------------------------------

def test_output_dir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    d = str(tmp_path / "run")
    with run_dir.OutputDirLock(d):
        with pytest.raises(run_dir.OutputDirInUse, match=r"is in use by another run \(process "
                           rf"{os.getpid()} on {socket.gethostname()}"):
            run_dir.OutputDirLock(d).acquire()
    assert not os.path.exists(os.path.join(d, run_dir.LOCK_NAME))  # released

    # A holder killed without releasing: same host, process gone -> taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(os.path.join(d, run_dir.LOCK_NAME), "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}, f)
    run_dir.OutputDirLock(d).acquire().release()
    # Another host's lock whose lease ran out -> taken over; a fresh one -> refused.
    path = os.path.join(d, run_dir.LOCK_NAME)
    with open(path, "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "token": "y"}, f)
    with pytest.raises(run_dir.OutputDirInUse, match="on elsewhere"):
        run_dir.OutputDirLock(d, lease_s=60).acquire()
    os.utime(path, (time.time() - 120, time.time() - 120))
    run_dir.OutputDirLock(d, lease_s=60).acquire().release()


def test_second_run_into_the_same_output_dir_fails_and_the_first_is_untouched(tmp_path):
    # An ALP run and a baseline run started into one directory used to both exit 0, the
    # baseline silently lost.
    out = str(tmp_path / "run")
    first = start_train(f"--config={ALP}", f"--output_dir={out}", "--config.max_steps=-1",
                        "--config.save_model_steps=1000", *TINY)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, run_dir.LOCK_NAME)), 120,
                 "the first run to lock its directory", first)
        r = run_train(f"--config={BASELINE}", f"--output_dir={out}", "--config.max_steps=2",
                      *TINY)
        assert r.returncode != 0
        assert "is in use by another run" in r.stderr
        assert first.poll() is None, "the first run must keep running"
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), 240,
                 "the first run to train", first)
        first.send_signal(signal.SIGTERM)
        assert first.wait(180) == 0
    finally:
        if first.poll() is None:
            first.kill()
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["train_lp_weight"] == 0.5  # the ALP run's, not overwritten by the baseline


# ---- 4. non-finite state is never saved; loss ceiling ------------------------------------

@pytest.mark.slow
def test_non_finite_weights_are_never_saved_and_the_guard_names_a_good_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    # A sane learning rate for a few steps, then one that overflows the weights. Saving
    # every step and logging rarely: the weights turn non-finite on a save step while the
    # loss of that step (computed before the update) is still finite.
    cfg = tiny_config(out, max_steps=60, save_model_steps=1, log_every_steps=1000,
                      lr_schedule="step", lr_list=[0.01, 1e38], lr_decay_epochs=[0.05],
                      weight_decay=0.0, keep_checkpoints=0)
    with pytest.raises(FloatingPointError) as err:
        train_lib.train(cfg)
    message = str(err.value)
    last = checkpoints.latest_step(out)
    assert last is not None and f"last good checkpoint is step {last}" in message
    for step in checkpoints.steps(out):  # every checkpoint on disk loads and is finite
        tree, _, _ = checkpoints.load_raw(checkpoints.step_dir(out, step))
        for leaf in jax.tree_util.tree_leaves(tree):
            if np.issubdtype(np.asarray(leaf).dtype, np.floating):
                assert np.all(np.isfinite(leaf)), step
    # Resume restores that checkpoint (it used to fail until the user deleted the NaN one).
    state = train_lib.train(tiny_config(out, max_steps=last, save_model_steps=1,
                                        keep_checkpoints=0, lr_schedule="step",
                                        lr_list=[0.01, 1e38], lr_decay_epochs=[0.05],
                                        weight_decay=0.0, log_every_steps=1000))
    assert int(state.step) == last


def test_loss_above_max_loss_stops_the_run(tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_config(out, max_steps=20, save_model_steps=0, log_every_steps=1,
                      max_loss=1e-3)
    with pytest.raises(FloatingPointError, match=r"above max_loss 0.001"):
        train_lib.train(cfg)


# ---- 5. resume only into the same run ---------------------------------------------------

@pytest.mark.slow
def test_resume_refuses_another_config_naming_the_fields(tmp_path):
    out = str(tmp_path / "run")
    train_lib.train(tiny_config(out, max_steps=2, save_model_steps=2))
    for overrides, field in (({"batch_size": 32}, "batch_size"),
                             ({"compute_dtype": "bfloat16"}, "compute_dtype"),
                             ({"model_name": "resnet_v2_50"}, "model_name"),
                             ({"moving_average_decay": -1.0}, "moving_average_decay"),
                             ({"optimizer": "momentum"}, "optimizer"),
                             ({"learning_rate": 0.1}, "learning_rate")):
        with pytest.raises(run_dir.ResumeMismatch, match=rf"{field}: .* there, .* now"):
            train_lib.train(tiny_config(out, max_steps=4, save_model_steps=2, **overrides))
    assert checkpoints.steps(out) == [2]
    assert json.load(open(os.path.join(out, "config.json")))["batch_size"] == 16
    # What may change (how long, how often) does not stop it; allow_resume_changes does not.
    train_lib.train(tiny_config(out, max_steps=4, save_model_steps=2, log_every_steps=1))
    assert checkpoints.latest_step(out) == 4
    train_lib.train(tiny_config(out, max_steps=6, save_model_steps=2, learning_rate=0.1,
                                allow_resume_changes=True))
    assert checkpoints.latest_step(out) == 6


@pytest.mark.slow
def test_baseline_config_into_an_alp_run_is_refused_by_the_program(tmp_path):
    out = str(tmp_path / "run")
    r = run_train(f"--config={ALP}", f"--output_dir={out}", "--config.max_steps=2",
                  "--config.save_model_steps=2", *TINY[:-1],
                  "--hparams=train_adv_method=pgdll_16_4_2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(f"--config={BASELINE}", f"--output_dir={out}", "--config.max_steps=4",
                  *TINY[:-1])
    assert r.returncode != 0
    assert "holds a run with a different config" in r.stderr
    assert "train_adv_method: 'pgdll_16_4_2' there, 'clean' now" in r.stderr
    assert checkpoints.steps(out) == [2]


# ---- 6, 7. integrity; a damaged newest checkpoint ---------------------------------------

@pytest.mark.slow
def test_damaged_checkpoint_is_reported_and_training_falls_back(tmp_path):
    out = str(tmp_path / "run")
    train_lib.train(tiny_config(out, max_steps=4, save_model_steps=2))
    _damage(checkpoints.step_dir(out, 4))
    # Evaluation (load_raw) refuses it by step instead of giving NaN weights.
    with pytest.raises(checkpoints.CheckpointDamaged, match=r"checkpoints/4 is damaged"):
        checkpoints.load_raw(out)
    r = subprocess.run([sys.executable, "-m", "alp_jax.eval", f"--checkpoint_path={out}",
                        "--num_examples=32"], cwd=REPO, env=program_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]  # it used to report 0.0000 with exit 0
    assert "checkpoints/4 is damaged" in r.stderr and "Traceback" not in r.stderr
    # Training reports it, moves it aside and resumes from step 2.
    train_lib.train(tiny_config(out, max_steps=6, save_model_steps=2))
    assert checkpoints.steps(out) == [2, 4, 6]
    moved = os.listdir(os.path.join(out, checkpoints.DAMAGED_SUBDIR))
    assert len(moved) == 1 and moved[0].startswith("4-")
    checkpoints.load_raw(out)  # the new step 6 is good


@pytest.mark.parametrize("damage", ["flip", "delete_state_file", "truncate_meta",
                                    "garbage_integrity"])
@pytest.mark.slow
def test_each_kind_of_damage_is_named_by_step(tmp_path, damage):
    out = str(tmp_path / "run")
    state = ts.create_train_state(helpers.small_model(), optax.sgd(0.1),
                                  jax.random.PRNGKey(0), 8)
    mngr = checkpoints.manager(out, async_save=False)
    checkpoints.save(mngr, 3, state, {"step": 3}, force=True)
    mngr.close()
    sd = checkpoints.step_dir(out, 3)
    if damage == "flip":
        _damage(sd)
    elif damage == "delete_state_file":
        files = [f for f in glob.glob(os.path.join(sd, "state", "**", "*"), recursive=True)
                 if os.path.isfile(f)]
        os.remove(max(files, key=os.path.getsize))
    elif damage == "truncate_meta":
        path = os.path.join(sd, "meta", "metadata")
        open(path, "w").write(open(path).read()[:5])
    else:
        open(os.path.join(sd, "integrity", "metadata"), "w").write('{"params": "0"}')
    assert checkpoints.latest_step(out) == 3  # eval and train agree on the newest step
    with pytest.raises(checkpoints.CheckpointDamaged, match=r"checkpoints/3 is damaged: \S"):
        checkpoints.load_raw(out)  # what evaluation reads
    mngr = checkpoints.manager(out, async_save=False)
    with pytest.raises(checkpoints.CheckpointDamaged, match=r"checkpoints/3 is damaged: \S"):
        checkpoints.read_meta(sd)  # what training reads first, then the state
        checkpoints.restore_state(mngr, 3, state)
    mngr.close()


# ---- 8. SIGTERM during the final save ---------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_the_final_save_keeps_the_final_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from alp_jax import checkpoints
        from test_run_guarantees import tiny_config
        from alp_jax import train as train_lib
        real_save = checkpoints.save
        def save(mngr, step, *a, **k):
            if step == 3:  # the final save: the scheduler's SIGTERM arrives now
                os.kill(os.getpid(), signal.SIGTERM)
            return real_save(mngr, step, *a, **k)
        checkpoints.save = save
        train_lib.train(tiny_config({out!r}, max_steps=3, save_model_steps=0))
        print("RETURNED")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=program_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RETURNED" in r.stdout
    assert checkpoints.steps(out) == [3]
    checkpoints.load_raw(out)


# ---- 9. pods: agreed preemption, a cluster that never forms --------------

def _cluster(out: str, port: int, *extra: str) -> list[subprocess.Popen]:
    return [start_train(f"--config={ALP}", f"--output_dir={out}", "--config.max_steps=-1",
                        "--config.save_model_steps=1000", *TINY,
                        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                        f"--process_id={i}", "--distributed_timeout_s=120", *extra,
                        devices=1, preexec_fn=cluster_priority) for i in range(2)]


@pytest.mark.slow
def test_preemption_of_one_process_saves_on_every_process_at_one_step(tmp_path):
    out = str(tmp_path / "run")
    procs = _cluster(out, free_port())
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), 300,
                 "the cluster to train", procs[0])
        procs[1].send_signal(signal.SIGTERM)  # only process 1 is preempted
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs, strict=True):
        assert p.returncode == 0, o[-3000:]
    step = checkpoints.latest_step(out)
    assert step is not None and step % 1000 != 0
    assert f"saved a checkpoint at step {step}" in outs[0]
    assert f"saved a checkpoint at step {step}" in outs[1]
    checkpoints.load_raw(out)


def test_process_zero_alone_exits_naming_the_address(tmp_path):
    port = free_port()
    r = run_train(f"--config={ALP}", f"--output_dir={tmp_path / 'run'}", *TINY,
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  "--process_id=0", "--distributed_timeout_s=5", timeout=120)
    assert r.returncode == 75, r.stderr[-3000:]
    assert f"did not form within 5s (coordinator 127.0.0.1:{port}, process 0 of 2)" in r.stderr


def test_a_port_that_is_no_coordinator_exits_naming_the_address(tmp_path):
    with socket.socket() as server:  # accepts connections, speaks no gRPC
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        r = run_train(f"--config={ALP}", f"--output_dir={tmp_path / 'run'}", *TINY,
                      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                      "--process_id=1", "--distributed_timeout_s=5", timeout=120)
    assert r.returncode == 75, r.stderr[-3000:]
    assert f"coordinator 127.0.0.1:{port}, process 1 of 2" in r.stderr


# ---- 10. a full disk ---------------------------------------------------------------------

def test_full_disk_is_one_clear_line(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        r = run_train(f"--config={ALP}", f"--output_dir={mount / 'run'}",
                      "--config.max_steps=2", "--config.save_model_steps=1", *TINY)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    assert r.returncode != 0
    assert f"No space left on the device holding {mount / 'run'}" in r.stderr
    assert r.stderr.count("Traceback") <= 1, r.stderr[-5000:]


def test_demo_in_another_compute_dtype_trains_its_own_runs(tmp_path, monkeypatch):
    # The demo re-run with another --compute_dtype used to reuse the float32 runs.
    from alp_jax import comparison, demo

    class Stop(Exception):
        pass

    seen = []

    def fake_train(cfg):
        seen.append((cfg.output_dir, cfg.compute_dtype))
        raise Stop

    monkeypatch.setattr(comparison, "train", fake_train)
    for dtype in (None, "bfloat16"):
        with pytest.raises(Stop):
            demo.run_demo(str(tmp_path), max_steps=1, compute_dtype=dtype)
    assert seen == [(str(tmp_path / "baseline"), "float32"),
                    (str(tmp_path / "baseline_bfloat16"), "bfloat16")]
