"""End-to-end tests of the train and eval programs on digits with the small model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from helpers import program_env

from alp_jax import checkpoints, finetune, slim_names
from alp_jax import eval as eval_lib
from alp_jax import train as train_lib
from alp_jax import train_state as ts
from alp_jax.config import resolve_config
from alp_jax.model import model_from_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "digits_alp"  # alp_jax/configs/digits.py:alp
# A tiny, fast ALP run: 8x8 digits, batch 16, 2 PGD iterations.
TINY = ["--config.dataset_image_size=8", "--config.batch_size=16", "--config.eval_batch_size=32",
        "--hparams=train_adv_method=pgdll_16_4_2,train_lp_weight=0.5",
        "--config.log_every_steps=2", "--config.save_summaries_steps=4"]


def tiny_config(output_dir: str, **overrides):
    cfg = resolve_config(_load(CONFIG))
    cfg.dataset_image_size = 8
    cfg.batch_size = 16
    cfg.eval_batch_size = 32
    cfg.train_adv_method = "pgdll_16_4_2"
    cfg.output_dir = output_dir
    cfg.log_every_steps = 2
    cfg.save_summaries_steps = 0
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _load(name):
    from alp_jax import configs

    return configs.get_config(name)


def run_program(module: str, *args: str, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=program_env(None),
                          capture_output=True, text=True, timeout=timeout, **kw)


def start_program(module: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=program_env(None),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}:\n{out}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def final_params(output_dir: str) -> dict[str, np.ndarray]:
    raw, _, _ = checkpoints.load_raw(output_dir)
    return slim_names.variables_to_slim({"params": raw["params"],
                                         "batch_stats": raw["batch_stats"]})


@pytest.mark.slow
def test_train_checkpoint_eval_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    r = run_program("alp_jax.train", f"--config={CONFIG}", f"--output_dir={out}",
                    "--config.max_steps=6", "--config.save_model_steps=3", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "steps/s" in r.stderr and "ETA" in r.stderr
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["3", "6"]
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert lines[-1]["step"] == 4 and {"loss_xent", "loss_lp", "loss_wd", "total_loss",
                                       "learning_rate", "current_epoch"} <= set(lines[-1])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))
    assert json.load(open(os.path.join(out, train_lib.DONE_FILE)))["step"] == 6
    csv = str(tmp_path / "results.csv")
    for attack in ("clean", "pgd_16_4_3"):
        r = run_program("alp_jax.eval", f"--checkpoint_path={out}", f"--adv_method={attack}",
                        f"--eval_name={attack}", f"--output_file={csv}", "--num_examples=64",
                        f"--train_dir={out}")
        assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.strip().split(",") for line in open(csv)]
    assert [row[0] for row in rows] == ["clean", "pgd_16_4_3"]
    top1 = [float(row[1]) for row in rows]
    assert all(0.0 <= t <= 1.0 for t in top1)
    assert os.path.exists(os.path.join(out, "pgd_16_4_3", "metrics.jsonl"))


@pytest.mark.slow
def test_sigkill_resume_matches_uninterrupted_run(tmp_path):
    common = [f"--config={CONFIG}", "--config.max_steps=80", "--config.save_model_steps=20",
              *TINY]
    ref = str(tmp_path / "ref")
    r = run_program("alp_jax.train", *common, f"--output_dir={ref}")
    assert r.returncode == 0, r.stderr[-3000:]

    out = str(tmp_path / "killed")
    proc = start_program("alp_jax.train", *common, f"--output_dir={out}")
    try:
        wait_for(lambda: (checkpoints.latest_step(out) or 0) >= 20, 240, "a checkpoint", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = checkpoints.latest_step(out)
    assert killed_at is not None and killed_at < 80, "the run finished before it was killed"
    r = run_program("alp_jax.train", *common, f"--output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Resumed from" in r.stderr
    a, b = final_params(ref), final_params(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
    out = str(tmp_path / "run")
    proc = start_program("alp_jax.train", f"--config={CONFIG}", f"--output_dir={out}",
                         "--config.max_steps=-1", "--config.save_model_steps=1000", *TINY)
    try:
        wait_for(lambda: os.path.exists(os.path.join(out, "metrics.jsonl")), 240,
                 "training to run", proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert rc == 0, output[-3000:]
    step = checkpoints.latest_step(out)
    assert step is not None and step >= 4 and step % 1000 != 0
    assert f"saved a checkpoint at step {step}" in output
    assert not os.path.exists(os.path.join(out, train_lib.DONE_FILE))


@pytest.mark.slow
def test_finetune_exclude_and_trainable_scopes(tmp_path):
    pre = str(tmp_path / "pre")
    train_lib.train(tiny_config(pre, max_steps=2, moving_average_decay=-1.0))
    pretrained = final_params(pre)

    cfg = tiny_config(str(tmp_path / "ft"), max_steps=3, moving_average_decay=-1.0,
                      finetune_checkpoint_path=pre,
                      finetune_exclude_pretrained_scopes="resnet_v2_small/logits",
                      finetune_trainable_scopes="resnet_v2_small/logits,resnet_v2_small/postnorm")
    model = model_from_config(cfg)
    fresh = jax.device_get(ts.init_variables(model, jax.random.split(
        jax.random.PRNGKey(cfg.seed))[0], cfg.dataset_image_size))
    loaded = slim_names.variables_to_slim(finetune.finetune_variables(
        fresh, pre, exclude_scopes=cfg.finetune_exclude_pretrained_scopes,
        trainable_scopes=cfg.finetune_trainable_scopes))
    fresh_named = slim_names.variables_to_slim(fresh)
    for name, value in loaded.items():
        expected = fresh_named[name] if name.startswith("resnet_v2_small/logits/") \
            else pretrained[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)

    state = train_lib.train(cfg)
    after = slim_names.variables_to_slim({"params": jax.device_get(state.params)})
    trained = ("resnet_v2_small/logits/", "resnet_v2_small/postnorm/")
    for name, value in after.items():
        if name.startswith(trained):
            continue
        np.testing.assert_array_equal(value, pretrained[name], err_msg=f"{name} moved")
    assert not np.array_equal(after["resnet_v2_small/logits/weights"],
                              fresh_named["resnet_v2_small/logits/weights"])

    with pytest.raises(ValueError, match="'resnet_v2_small/nope' matches no variable"):
        finetune.finetune_variables(fresh, pre, exclude_scopes="resnet_v2_small/nope")
    with pytest.raises(ValueError, match="matches no variable"):
        finetune.finetune_variables(fresh, pre, trainable_scopes="resnet_v2_50/logits")
    other = model_from_config(tiny_config("", num_classes=7))
    fresh7 = jax.device_get(ts.init_variables(other, jax.random.PRNGKey(0), 8))
    with pytest.raises(ValueError, match="(?s)shapes differ.*logits/weights"):
        finetune.finetune_variables(fresh7, pre)
    finetune.finetune_variables(fresh7, pre, exclude_scopes="resnet_v2_small/logits")


@pytest.mark.slow
def test_finetune_reads_averages_only_for_trainable_parameters(tmp_path):
    # The original's _get_finetuning_init_fn: moving averages for the variables that train
    # in the new run, raw values for frozen ones and for the BatchNorm statistics.
    pre = str(tmp_path / "pre")
    train_lib.train(tiny_config(pre, max_steps=3, moving_average_decay=0.9))
    raw_tree, _, _ = checkpoints.load_raw(pre)
    raw = slim_names.variables_to_slim({"params": raw_tree["params"],
                                        "batch_stats": raw_tree["batch_stats"]})
    ema = slim_names.variables_to_slim({"params": raw_tree["ema_params"],
                                        "batch_stats": raw_tree["ema_batch_stats"]})
    model = model_from_config(tiny_config(""))
    fresh = jax.device_get(ts.init_variables(model, jax.random.PRNGKey(0), 8))
    param_names = set(slim_names.slim_names({"params": fresh["params"]}))
    trainable = ("resnet_v2_small/logits/", "resnet_v2_small/postnorm/")
    loaded = slim_names.variables_to_slim(finetune.finetune_variables(
        fresh, pre, trainable_scopes="resnet_v2_small/logits,resnet_v2_small/postnorm",
        use_ema=True))
    for name, value in loaded.items():
        want = ema if name in param_names and name.startswith(trainable) else raw
        np.testing.assert_array_equal(value, want[name], err_msg=name)
    assert not np.array_equal(ema["resnet_v2_small/logits/weights"],
                              raw["resnet_v2_small/logits/weights"])  # the test can tell
    # No trainable scopes: every parameter trains, so every parameter is averaged.
    everything = slim_names.variables_to_slim(finetune.finetune_variables(
        fresh, pre, use_ema=True))
    for name, value in everything.items():
        np.testing.assert_array_equal(value, (ema if name in param_names else raw)[name],
                                      err_msg=name)


@pytest.mark.slow
def test_continuous_eval_picks_up_new_checkpoints(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    proc = start_program("alp_jax.eval", f"--train_dir={out}", "--eval_interval_secs=1",
                         "--num_examples=32", "--eval_name=watch")
    try:
        time.sleep(2)
        assert proc.poll() is None, proc.stdout.read()
        train_lib.train(tiny_config(out, max_steps=4, save_model_steps=2))
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert rc == 0, output[-3000:]
    steps = [json.loads(x)["step"] for x in open(os.path.join(out, "watch", "metrics.jsonl"))]
    assert steps[-1] == 4
    assert "evaluation done" in output


def _parse(define, argv):
    fv = flags.FlagValues()
    define(fv)
    fv(["prog", *argv])
    return fv


def test_original_readme_commands_parse(tmp_path):
    imagenet = tmp_path / "imagenet"
    tiny = tmp_path / "tiny"
    imagenet.mkdir()
    tiny.mkdir()
    fv = _parse(train_lib.define_flags, [
        "--model_name=resnet_v2_50",
        "--hparams=train_adv_method=pgdll_16_2_10,train_lp_weight=0.5",
        "--dataset=imagenet", "--dataset_image_size=64", "--output_dir=/tmp/adv_train",
        f"--imagenet_data_dir={imagenet}"])
    cfg = train_lib.config_from_flags(fv)
    from alp_jax import cli

    cli.validate_config(cfg, training=True)
    assert (cfg.model_name, cfg.train_adv_method, cfg.train_lp_weight, cfg.dataset,
            cfg.dataset_image_size, cfg.output_dir, cfg.imagenet_data_dir) == (
        "resnet_v2_50", "pgdll_16_2_10", 0.5, "imagenet", 64, "/tmp/adv_train", str(imagenet))
    assert cfg.learning_rate == 0.045 and cfg.optimizer == "rms" and cfg.batch_size == 32

    fv = _parse(train_lib.define_flags, [
        "--model_name=resnet_v2_50",
        "--hparams=train_adv_method=pgdll_16_2_10,train_lp_weight=0.5,learning_rate=0.02",
        "--dataset=tiny_imagenet", "--dataset_image_size=64", "--output_dir=/tmp/adv_finetune",
        f"--tiny_imagenet_data_dir={tiny}",
        "--finetune_exclude_pretrained_scopes=resnet_v2_50/logits",
        "--finetune_trainable_scopes=resnet_v2_50/logits,resnet_v2_50/postnorm",
        "--finetune_checkpoint_path=/tmp/adv_train", "--max_steps=1000",
        "--moving_average_decay=-1"])
    cfg = train_lib.config_from_flags(fv)
    cli.validate_config(cfg, training=True)
    assert cfg.learning_rate == 0.02 and cfg.dataset == "tiny_imagenet"
    assert cfg.finetune_trainable_scopes == "resnet_v2_50/logits,resnet_v2_50/postnorm"
    assert cfg.finetune_exclude_pretrained_scopes == "resnet_v2_50/logits"
    assert cfg.finetune_checkpoint_path == "/tmp/adv_train"
    assert cfg.max_steps == 1000 and cfg.moving_average_decay == -1.0

    fv = _parse(eval_lib.define_flags, [
        "--train_dir=/tmp/adv_train", "--dataset=imagenet", "--dataset_image_size=64",
        "--split_name=train", "--adv_method=clean", "--hparams=eval_batch_size=50",
        "--num_examples=10000", "--eval_once=True", f"--imagenet_data_dir={imagenet}"])
    cfg = eval_lib.eval_config({"model_name": "resnet_v2_50", "num_classes": 1001}, fv)
    cli.validate_config(cfg, training=False)
    assert (cfg.split_name, cfg.adv_method, cfg.eval_batch_size, cfg.num_examples,
            cfg.num_classes) == ("train", "clean", 50, 10000, 1001)
    assert fv.eval_once

    fv = _parse(eval_lib.define_flags, [
        "--train_dir=tmp/adv_finetune",
        "--trainable_scopes=resnet_v2_50/logits,resnet_v2_50/postnorm",
        "--dataset=tiny_imagenet", "--dataset_image_size=64", "--adv_method=pgdrnd_16_2_10",
        "--hparams=eval_batch_size=50", "--eval_once=True", f"--tiny_imagenet_data_dir={tiny}"])
    cfg = eval_lib.eval_config({}, fv)
    cli.validate_config(cfg, training=False)
    assert (cfg.adv_method, cfg.num_classes, cfg.split_name) == (
        "pgdrnd_16_2_10", 200, "validation")


@pytest.mark.parametrize("argv,message", [
    (["--hparams=foo=1"], "Unknown hparam 'foo'; valid names: batch_size"),
    (["--hparams=batch_size=abc"], "batch_size='abc': expected a int"),
    (["--hparams=train_adv_method=pgd_16_2"], "Invalid attack spec 'pgd_16_2'"),
    (["--dataset=cifar10"], "Unknown dataset 'cifar10'"),
    (["--model_name=resnet_v2_18"], "Unknown model_name 'resnet_v2_18'"),
    (["--dataset=tiny_imagenet"], "needs --tiny_imagenet_data_dir"),
    (["--dataset=imagenet", "--imagenet_data_dir=/nonexistent/dir"], "is not a directory"),
    (["--hparams=optimizer=sgd"], "Unknown optimizer 'sgd'"),
    # Values outside their range (issue 15): each names the field, the value and the range.
    (["--hparams=learning_rate=-0.1"], "learning_rate must be > 0, got -0.1."),
    (["--hparams=rmsprop_epsilon=0"], "rmsprop_epsilon must be > 0, got 0.0."),
    (["--hparams=weight_decay=-1"], "weight_decay must be >= 0, got -1.0."),
    (["--hparams=lr_decay_factor=0"], "lr_decay_factor must be > 0, got 0.0."),
    (["--max_steps=-5"], "max_steps must be >= -1, got -5."),
    (["--moving_average_decay=1.5"], "moving_average_decay must be < 1, got 1.5."),
    (["--dataset_image_size=4"], "dataset_image_size must be >= 8, got 4."),
])
def test_bad_flags_give_clear_errors_and_write_nothing(tmp_path, argv, message):
    out = tmp_path / "never"
    fv = _parse(train_lib.define_flags, [f"--output_dir={out}", *argv])
    from alp_jax import cli

    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        cli.validate_config(train_lib.config_from_flags(fv), training=True)
    assert not out.exists()


def test_bad_flag_in_program_exits_nonzero_without_output(tmp_path):
    out = tmp_path / "never"
    r = run_program("alp_jax.train", f"--output_dir={out}", "--hparams=train_lp_weight=x")
    assert r.returncode != 0
    assert "train_lp_weight='x'" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    # A sane learning rate for 4 steps, then one so large that the weights overflow.
    cfg = tiny_config(out, max_steps=60, save_model_steps=2, log_every_steps=1,
                      train_adv_method="clean", lr_schedule="step", lr_list=[0.01, 1e30],
                      lr_decay_epochs=[0.05], weight_decay=0.0)
    with pytest.raises(FloatingPointError, match=r"Loss is (nan|inf) at step \d+") as err:
        train_lib.train(cfg)
    bad_step = int(str(err.value).split(" at step ")[1].split()[0])
    last = checkpoints.latest_step(out)
    assert last is not None and 4 <= last < bad_step
    assert f"last good checkpoint is step {last}" in str(err.value)
    for name, value in final_params(out).items():
        assert np.all(np.isfinite(value)), name
