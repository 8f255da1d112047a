"""Faults as users meet them (issue 24): each ends in one clear line, never a traceback.

One small checkpoint run (``digits_baseline``, 16x16, steps 2, 4 and 6) is trained once
for the module; each test damages its own copy. The programs run as subprocesses only
where the fault was in what the program prints; the rest call the library.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cluster_priority, free_port, program_env

from alp_jax import checkpoints, cli, configs, evaluator, finetune, restore, run_dir, sharding
from alp_jax import train_state as ts
from alp_jax import trainer as trainer_lib
from alp_jax.config import resolve_config
from alp_jax.errors import ConfigError
from alp_jax.model import model_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = [2, 4, 6]


def _config(output_dir: str, **overrides):
    cfg = resolve_config(configs.get_config("digits_baseline"))
    cfg.batch_size, cfg.eval_batch_size, cfg.num_examples = 16, 32, 32
    cfg.output_dir, cfg.max_steps, cfg.save_model_steps = output_dir, STEPS[-1], 2
    cfg.keep_checkpoints, cfg.save_summaries_steps, cfg.log_every_steps = 0, 0, 2
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A finished run's directory as training leaves it (checkpoints at STEPS, written by
    its Checkpointer with its meta, TRAINING_DONE at the last), without compiling a train
    step: the faults are about the files, not the weights."""
    out = str(tmp_path_factory.mktemp("faults") / "run")
    cfg = _config(out)
    model = model_from_config(cfg)
    tx, _ = ts.optimizer_from_config(cfg)
    state, _ = restore.restore_or_init(cfg, model, tx, sharding.make_mesh(1), out)
    with checkpoints.Checkpointer(out, keep=0, meta=functools.partial(
            trainer_lib.checkpoint_meta, cfg)) as ckpt:
        for step in STEPS:
            ckpt.save(step, state)
    trainer_lib.write_json_atomic(os.path.join(out, trainer_lib.DONE_FILE), {"step": STEPS[-1]})
    assert checkpoints.steps(out) == STEPS
    return out


def _copy(run: str, tmp_path) -> str:
    dest = str(tmp_path / "run")
    shutil.copytree(run, dest)
    return dest


def _flip(step_dir: str) -> None:
    """Changes three bytes of the largest state file (the parameters)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f)]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    for i in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        data[i] ^= 0x5A
    open(path, "wb").write(bytes(data))


def _program(module: str, *args: str, prefix: tuple[str, ...] = (), timeout: int = 300
             ) -> subprocess.CompletedProcess:
    env = program_env(None, JAX_PLATFORMS="cpu")
    return subprocess.run([*prefix, sys.executable, "-m", module, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(r: subprocess.CompletedProcess, message: str) -> None:
    """Status 1, ``message`` in the last line of stderr, no traceback, no usage text."""
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "USAGE" not in r.stderr, r.stderr[-3000:]
    last = [x for x in r.stderr.splitlines() if x.strip()][-1]
    assert message in last, r.stderr[-3000:]


# ---- 1. summary images on a cluster ----------------------------------------------------

_GATHER = r"""
import json, sys
import jax, numpy as np
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from alp_jax import monitor
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
me = jax.process_index()
local = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) + 100 * me  # this process's rows
batch = jax.make_array_from_process_local_data(sh, local, (8, 3))
images = jax.jit(lambda x: (x[:6] * 2, x[:6] - 1))(batch)  # as Monitor's images_fn slices
try:
    jax.device_get(images)
    direct = "fetched"
except RuntimeError as e:
    direct = str(e).splitlines()[0]
clean, adv = monitor.fetch(images)
print("REPORT " + json.dumps({"direct": direct, "clean": clean.tolist(), "adv": adv.tolist()}))
"""


def test_summary_images_of_a_batch_spread_over_two_processes_are_gathered(tmp_path):
    """The images of a batch sharded over two processes' devices cannot be fetched with
    ``jax.device_get`` (the step-50 RuntimeError); ``monitor.fetch`` gathers them on
    every process from each process's own shards."""
    script = tmp_path / "gather.py"
    script.write_text(_GATHER)
    address = f"127.0.0.1:{free_port()}"
    env = program_env(None, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), address, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=cluster_priority)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    rows = [[float(3 * i + j) for j in range(3)] for i in range(4)]
    rows += [[100.0 + 3 * i + j for j in range(3)] for i in range(2)]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
        report = json.loads(next(x for x in out.splitlines()
                                 if x.startswith("REPORT "))[len("REPORT "):])
        assert "non-addressable" in report["direct"]  # what monitor._images used to hit
        assert report["clean"] == [[2 * v for v in r] for r in rows]
        assert report["adv"] == [[v - 1 for v in r] for r in rows]


# ---- 3. continuous eval beside training's rotation ---------------------------------------

def test_continuous_eval_skips_a_checkpoint_rotation_removed_and_names_real_damage(
        run, tmp_path, monkeypatch, caplog):
    """Rotation removes step 4 while eval reads it (and step 6 appears, as with
    ``keep_checkpoints=1``): one line, then step 6 is evaluated. A step still present but
    corrupt is reported by step."""
    out = _copy(run, tmp_path)
    stash = str(tmp_path / "six")
    shutil.move(checkpoints.step_dir(out, 6), stash)  # not written yet when eval starts
    real_load = checkpoints._load_raw

    def rotate_while_reading(step_dir):
        if os.path.basename(step_dir) == "4":
            shutil.move(stash, checkpoints.step_dir(out, 6))
            shutil.rmtree(step_dir)
        return real_load(step_dir)

    monkeypatch.setattr(checkpoints, "_load_raw", rotate_while_reading)

    def config_for(meta):
        cfg = cli.recorded_config(meta)
        cfg.num_examples, cfg.eval_batch_size = 32, 32
        return cfg

    csv = str(tmp_path / "eval.csv")
    with caplog.at_level(logging.INFO):
        evaluator.continuous_eval(out, config_for, interval=0, once=False, output_file=csv)
    skipped = [r.getMessage() for r in caplog.records if "rotation" in r.getMessage()]
    assert skipped == [f"Checkpoint {checkpoints.step_dir(out, 4)} was removed by training's "
                       "checkpoint rotation while being read; skipping it for the newest one."]
    assert len(open(csv).read().splitlines()) == 1  # step 6 only, once
    assert any(f"{checkpoints.step_dir(out, 6)} step 6" in r.getMessage()
               for r in caplog.records)

    monkeypatch.setattr(checkpoints, "_load_raw", real_load)
    _flip(checkpoints.step_dir(out, 6))
    with pytest.raises(checkpoints.CheckpointDamaged, match=r"checkpoints/6 is damaged: \S"):
        evaluator.continuous_eval(out, config_for, interval=0, once=False)


# ---- 4. checksums required ---------------------------------------------------------------

def test_checkpoint_without_checksums_is_refused_on_every_load_path(run, tmp_path, caplog):
    """The issue's tampering removed the integrity item (and then changed the weights,
    which nothing could notice): eval (the program), robustness, training's resume,
    fine-tuning and TF export all refuse such a checkpoint before reading its state,
    naming the step and the flag; with the flag each load logs a warning."""
    out = _copy(run, tmp_path)
    sd = checkpoints.step_dir(out, 6)
    os.remove(os.path.join(sd, "integrity", "metadata"))
    refused = r"checkpoints/6 has no checksums .* pass --allow_unverified_checkpoint"

    r = _program("alp_jax.eval", f"--checkpoint_path={out}", "--num_examples=32")
    _one_line(r, f"FATAL: Checkpoint {sd} has no checksums")
    assert "--allow_unverified_checkpoint" in r.stderr

    cfg = _config(out)
    with pytest.raises(checkpoints.CheckpointUnverified, match=refused):
        evaluator.run_robustness(cfg, out, str(tmp_path / "rob"), log=lambda _: None)
    model = model_from_config(cfg)
    fresh = jax.eval_shape(  # names and shapes: the refusal comes before any value is used
        lambda k: ts.init_variables(model, k, cfg.dataset_image_size), jax.random.PRNGKey(0))
    mesh = sharding.make_mesh(1)
    tx, _ = ts.optimizer_from_config(cfg)
    with pytest.raises(checkpoints.CheckpointUnverified, match=refused):
        restore.restore_or_init(cfg, model, tx, mesh, out)
    assert checkpoints.steps(out) == STEPS  # refused, not moved aside as damage
    with pytest.raises(checkpoints.CheckpointUnverified, match=refused):
        finetune.finetune_variables(fresh, out)
    from alp_jax import tf_checkpoint

    with pytest.raises(checkpoints.CheckpointUnverified, match=refused):
        tf_checkpoint.export_tf_checkpoint(out, str(tmp_path / "tf" / "model.ckpt"))

    allowed = _config(out, allow_unverified_checkpoint=True)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            evaluator.load_for_eval(sd, allowed)
    warned = [r for r in caplog.records if "without checksums" in r.getMessage()]
    assert len(warned) == 2 and sd in warned[0].getMessage()
    # The flag is this command's: an evaluation never takes it from a recorded config.
    meta = {**checkpoints.read_meta(sd), "config": {**checkpoints.read_meta(sd)["config"],
                                                    "allow_unverified_checkpoint": True}}
    from absl import flags

    fv = flags.FlagValues()
    cli.define_common_flags(fv)
    fv(["prog"])
    assert cli.checkpoint_config(meta, {}, fv).allow_unverified_checkpoint is False


def test_every_checkpoint_written_carries_checksums(run, tmp_path):
    """Training's checkpoints and bare variables (what the TF import writes) both record a
    checksum per group."""
    for step in STEPS:
        recorded = checkpoints.read_integrity(checkpoints.step_dir(run, step))
        assert recorded and {"params", "opt_state", "batch_stats"} <= set(recorded)
    raw, meta, _ = checkpoints.load_raw(run)
    sd = checkpoints.save_variables(str(tmp_path / "imported"),
                                    checkpoints.variables_from_tree(raw, run), meta)
    assert set(checkpoints.read_integrity(sd)) == {"params", "batch_stats"}


def _numpy_checksum(leaves) -> str:
    """The checksum format, written independently in numpy: per leaf, two wrapping uint32
    sums of position-salted MurmurHash3 finalisers of its bit patterns; summed over the
    leaves. Checkpoints written by any version of this code must keep verifying."""
    def fmix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    total = np.zeros(2, np.uint32)
    with np.errstate(over="ignore"):
        for x in leaves:
            x = np.asarray(x)
            bits = (x.astype(np.uint32) if x.dtype == bool else
                    x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.itemsize])
                    .astype(np.uint32)).reshape(-1)
            idx = np.arange(bits.size, dtype=np.uint32)
            h1 = np.sum(fmix(bits ^ fmix(idx)), dtype=np.uint32)
            h2 = np.sum(fmix(bits + idx * np.uint32(0x9E3779B9)) * (np.uint32(2) * idx + 1),
                        dtype=np.uint32)
            total = total + np.array([h1, h2], np.uint32)
    return f"{int(total[0]):08x}{int(total[1]):08x}"


def test_checksums_keep_their_format_and_see_one_changed_element():
    """``fingerprint`` hashes leaf by leaf (fast to trace); the value is the recorded
    format, the same for any sharding of a leaf, and moves with any single element.
    Both of its paths give that value: NumPy for host and CPU arrays (no compile), and
    the jitted device function (accelerators, shards on other processes), forced here."""
    rng = np.random.default_rng(0)
    tree = {"params": {"w": rng.normal(size=(3, 3, 4, 8)).astype(np.float32),
                       "b": rng.normal(size=(8,)).astype(np.float32),
                       "h": rng.normal(size=(5,)).astype(jnp.bfloat16)},
            "step": {"n": np.array(7, np.int32), "flag": np.array([True, False]),
                     "q": rng.integers(0, 255, size=(2, 3)).astype(np.uint8)}}
    compiled = checkpoints._leaf_fingerprint._cache_size()
    fp = checkpoints.fingerprint(tree)
    on_cpu = checkpoints.fingerprint(jax.device_put(tree))
    assert checkpoints._leaf_fingerprint._cache_size() == compiled  # nothing compiled
    assert on_cpu == fp
    for name, group in tree.items():
        leaves = jax.tree_util.tree_leaves(group)
        assert fp[name] == {"checksum": _numpy_checksum(leaves), "finite": True}, name
        for x in leaves:  # the device path, leaf by leaf
            (h, finite), want = checkpoints._leaf_fingerprint(x), _numpy_checksum([x])
            assert f"{int(h[0]):08x}{int(h[1]):08x}" == want and bool(finite), (name, x)
    inf = np.array([1.0, np.inf], jnp.bfloat16)
    assert not checkpoints._host_leaf_fingerprint(inf)[1]
    assert not bool(checkpoints._leaf_fingerprint(inf)[1])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    spread = jax.device_put(tree["params"]["w"], jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, None, None, "data")))
    assert checkpoints.fingerprint({**tree, "params": {**tree["params"], "w": spread}}) == fp
    for i in (0, 17, tree["params"]["w"].size - 1):
        w = tree["params"]["w"].copy().reshape(-1)
        w[i] = np.nextafter(w[i], np.float32(np.inf))
        changed = checkpoints.fingerprint(
            {**tree, "params": {**tree["params"], "w": w.reshape(3, 3, 4, 8)}})["params"]
        assert changed["checksum"] != fp["params"]["checksum"] and changed["finite"], i
    w = tree["params"]["b"].copy()
    w[3] = np.inf
    assert checkpoints.fingerprint({"params": {"b": w}})["params"]["finite"] is False


# ---- 5. the smaller gaps ---------------------------------------------------------------

def test_deleted_meta_is_one_line_naming_the_step(run, tmp_path):
    out = _copy(run, tmp_path)
    sd = checkpoints.step_dir(out, 6)
    shutil.rmtree(os.path.join(sd, "meta"))
    r = _program("alp_jax.eval", f"--checkpoint_path={out}", "--num_examples=32")
    _one_line(r, f"FATAL: Checkpoint {sd} is damaged: its meta item")


def test_model_other_than_the_checkpoints_is_refused_before_its_state_is_read(
        run, monkeypatch):
    r = _program("alp_jax.eval", f"--checkpoint_path={run}", "--config=digits_baseline",
                 "--config.model_name=resnet_v2_50", "--num_examples=32")
    _one_line(r, f"FATAL config error: model_name resnet_v2_50 does not match checkpoint "
                 f"{checkpoints.step_dir(run, 6)}, which holds a resnet_v2_small")

    def never(*a, **k):
        raise AssertionError("the state was read")

    monkeypatch.setattr(checkpoints, "load_raw", never)
    with pytest.raises(ConfigError, match="holds a resnet_v2_small"):
        evaluator.load_for_eval(checkpoints.step_dir(run, 6),
                                _config(run, model_name="resnet_v2_50"))


def test_eval_batch_that_does_not_split_over_the_processes_is_refused_before_loading(
        run, monkeypatch):
    sd = checkpoints.step_dir(run, 6)
    meta = checkpoints.read_meta(sd)
    with pytest.raises(ConfigError, match=r"^--eval_batch_size=7: Batch size 7 must be "
                       r"positive and divide by the 2 processes\. Pass a multiple of 2\.$"):
        evaluator.check_before_load(_config(run, eval_batch_size=7), meta, sd, 2)
    evaluator.check_before_load(_config(run, eval_batch_size=8), meta, sd, 2)
    evaluator.check_before_load(_config(run, eval_batch_size=7), meta, sd, 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(checkpoints, "load_raw", lambda *a, **k: pytest.fail("state read"))
    with pytest.raises(ConfigError, match="Batch size 7"):
        evaluator.load_for_eval(sd, _config(run, eval_batch_size=7))


def test_second_robustness_run_into_one_output_dir_is_refused(run, tmp_path):
    out = str(tmp_path / "rob")
    with run_dir.OutputDirLock(out):  # the first run, still going
        r = _program("alp_jax.robustness", f"--checkpoint_path={run}", f"--output_dir={out}",
                     "--attacks=pgd_16_2_1", "--eps=16", "--num_examples=32")
    _one_line(r, f"FATAL: --output_dir {out} is in use by another run (process {os.getpid()}")
    assert os.listdir(out) == []  # nothing written into the first run's directory


@pytest.mark.parametrize("flag,valid", [
    ("--eps=0", "got 0"), ("--eps=300", "got 300"), ("--attacks=nonsense_1_2", "'nonsense_1_2'"),
    ("--num_examples=0", "got 0")])
def test_bad_suite_flag_is_one_line_without_the_usage_text(tmp_path, flag, valid):
    r = _program("alp_jax.robustness", f"--checkpoint_path={tmp_path}",
                 f"--output_dir={tmp_path / 'rob'}", flag, timeout=120)
    _one_line(r, "FATAL config error: ")
    assert valid in r.stderr and len([x for x in r.stderr.splitlines() if x.strip()]) <= 3


def _read_only(directory: str) -> tuple[str, ...]:
    """A command prefix that runs the program with ``directory`` bind-mounted read-only
    (a private mount namespace: root, whom permissions do not stop, gets EROFS)."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c",
                            f"mount --bind -o ro {directory} {directory} && "
                            f"! touch {directory}/probe"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no read-only bind mount here (unshare -m needs CAP_SYS_ADMIN)")
    return ("unshare", "-m", "sh", "-c",
            f'mount --bind -o ro {directory} {directory} && exec "$0" "$@"')


def test_output_dir_on_a_read_only_file_system_is_one_line(run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    prefix = _read_only(str(ro))
    r = _program("alp_jax.train", "--config=digits_baseline", f"--output_dir={ro / 'train'}",
                 "--config.max_steps=1", prefix=prefix)
    _one_line(r, f"--output_dir={str(ro / 'train')!r} is not writable (Read-only file system)")
    r = _program("alp_jax.robustness", f"--checkpoint_path={run}", f"--output_dir={ro / 'rob'}",
                 "--attacks=pgd_16_2_1", "--eps=16", "--num_examples=32", prefix=prefix)
    _one_line(r, f"--output_dir={str(ro / 'rob')!r} is not writable (Read-only file system)")
    assert os.listdir(ro) == []
