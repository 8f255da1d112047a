"""Guards that keep a run from reporting a wrong number or failing late (issue 15).

Each test reproduces one finding: out-of-range labels scored as correct, config values
outside their valid range accepted, unknown / mistyped ``--config.*`` fields ending in a
long traceback, ``--num_examples`` larger than the split, a killed converter leaving files.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from helpers import program_env

from alp_jax import checkpoints, cli, configs, data, losses
from alp_jax import train as train_lib
from alp_jax.config import ConfigError, default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The file spelling of the shipped digits_alp (tests/test_configs.py covers the names).
CONFIG = os.path.join(REPO, "alp_jax", "configs", "digits.py") + ":alp"


def run_program(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=program_env(None),
                          capture_output=True, text=True, timeout=timeout)


def test_topk_correct_never_counts_out_of_range_labels():
    # All-equal logits: top-5 of 10 classes holds classes 0..4, and the old lookup of label
    # 15 gave NaN, which nothing is greater than, so it counted as correct.
    logits = jnp.zeros((5, 10)).at[:, 9].set(1.0)
    labels = jnp.array([9, 15, -1, 10, 0])
    for k in (1, 5, 10):
        got = np.asarray(losses.topk_correct(logits, labels, k))
        assert got.tolist() == [True, False, False, False, k >= 2], k


def test_check_labels_names_label_index_and_class_count():
    losses.check_labels(np.array([0, 9, 3]), 10)
    losses.check_labels(np.zeros((0,), np.int32), 10)
    with pytest.raises(ValueError, match=r"^labels: label 15 at index 3 is outside \[0, 10\): "
                       r"the model has 10 classes \(does --config.num_classes match"):
        losses.check_labels(np.array([1, 2, 3, 15, 17]), 10)
    with pytest.raises(ValueError, match=r"^eval labels: label -1 at index 0 is outside"):
        losses.check_labels(np.array([-1, 2]), 10, what="eval labels")


# ---- a model with fewer classes than the data's labels ----------------------------------

def test_eval_of_a_model_with_fewer_classes_than_the_labels_stops(small_variables, tmp_path):
    # The 10-class initialisation cut to 5 logits: digits labels 5..9 have no logit. Such a
    # model once scored 53% top-1 on data with twice its classes.
    v = jax.device_get(small_variables)
    logits = v["params"]["resnet_v2_small"]["logits"]
    params = {**v["params"], "resnet_v2_small": {
        **v["params"]["resnet_v2_small"],
        "logits": {"weights": logits["weights"][..., :5], "biases": logits["biases"][:5]}}}
    meta = {"model_name": "resnet_v2_small", "num_classes": 5, "config": {
        "dataset": "digits", "dataset_image_size": 8, "moving_average_decay": -1.0,
        "eval_batch_size": 32}}
    ckpt = checkpoints.save_variables(str(tmp_path / "five"),
                                      {"params": params, "batch_stats": v["batch_stats"]}, meta)
    csv = tmp_path / "results.csv"
    r = run_program("alp_jax.eval", f"--checkpoint_path={ckpt}", "--num_examples=64",
                    f"--output_file={csv}")
    assert r.returncode != 0, r.stderr[-3000:]
    assert re.search(r"labels: label \d at index \d+ is outside \[0, 5\): the model has 5 "
                     r"classes \(does --config.num_classes match the data set\?\)", r.stderr), \
        r.stderr[-3000:]
    assert "FATAL config error: evaluation labels: label" in r.stderr  # one line, no traceback
    assert "Traceback" not in r.stderr
    assert not csv.exists()


# ---- config values outside their range --------------------------------------------------

def _train_cfg(tmp_path, **fields):
    cfg = default_config()
    cfg.model_name = "resnet_v2_small"
    cfg.output_dir = str(tmp_path / "never")
    with cfg.ignore_type():
        for k, v in fields.items():
            cfg[k] = v
    return cfg


BAD_VALUES = [  # field, value, the valid range as the message states it
    ("log_every_steps", 0, ">= 1"),
    ("save_summaries_steps", -1, ">= 0"),
    ("save_model_steps", -5, ">= 0"),
    ("keep_checkpoints", -1, ">= 0"),
    ("learning_rate", -0.1, "> 0"),
    ("learning_rate", 0.0, "> 0"),
    ("learning_rate", float("nan"), "> 0"),
    ("label_smoothing", 2.0, "in [0, 1)"),
    ("label_smoothing", 1.0, "in [0, 1)"),
    ("weight_decay", -1e-4, ">= 0"),
    ("momentum", 1.0, "in [0, 1)"),
    ("rmsprop_decay", -0.1, "in [0, 1)"),
    ("rmsprop_epsilon", 0.0, "> 0"),
    ("moving_average_decay", 1.0, "< 1"),
    ("bn_decay", 1.0, "in (0, 1)"),
    ("bn_decay", 0.0, "in (0, 1)"),
    ("train_lp_weight", -0.5, ">= 0"),
    ("objective_weight", -1.0, ">= 0"),
    ("lr_decay_factor", 0.0, "> 0"),
    ("lr_num_epochs_per_decay", 0.0, "> 0"),
    ("num_summary_images", -1, ">= 0"),
    ("max_steps", -2, ">= -1"),
    ("examples_per_epoch", 0, "-1 (from the dataset) or >= 1"),
    ("num_classes", 1, "-1 (from the dataset) or >= 2"),
    ("seed", -1, "in [0, 4294967296)"),
    ("bn_group_size", -1, ">= 0"),
    ("mesh_model_axis", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("num_replicas", 0, ">= 1"),
    ("dataset_image_size", 4, ">= 8"),
    ("log_every_steps", 2.5, "an integer"),
    ("learning_rate", "0.1", "a number"),
    ("learning_rate", float("inf"), "> 0"),
]


@pytest.mark.parametrize("field,value,valid", BAD_VALUES,
                         ids=[f"{f}={v}" for f, v, _ in BAD_VALUES])
def test_validate_config_names_field_value_and_range(tmp_path, field, value, valid):
    with pytest.raises(ConfigError) as err:
        cli.validate_config(_train_cfg(tmp_path, **{field: value}), training=True)
    message = str(err.value)
    assert message.startswith(f"{field} must be {valid}, got {value!r}"), message
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("fields,message", [
    ({"lr_schedule": "step", "lr_list": [0.1, -0.01], "lr_decay_epochs": [1]},
     r"lr_list\[1\] must be > 0, got -0.01"),
    ({"lr_schedule": "step", "lr_list": [0.1, 0.01, 0.001], "lr_decay_epochs": [2, 1]},
     r"lr_decay_epochs must be increasing and >= 0, got \[2, 1\]"),
    ({"bounds": (1.0, -1.0)}, r"bounds must be \(low, high\) with low < high, got \(1.0, -1.0\)"),
])
def test_validate_config_checks_lists(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        cli.validate_config(_train_cfg(tmp_path, **fields), training=True)


def test_evaluation_checks_only_what_evaluation_reads(tmp_path):
    # A checkpoint's recorded config is evaluated as it is: training-only fields are not
    # the evaluation's business; the evaluation's own fields are.
    cli.validate_config(_train_cfg(tmp_path, log_every_steps=0, learning_rate=-1.0),
                        training=False)
    with pytest.raises(ConfigError, match=r"eval_interval_secs must be >= 0, got -1"):
        cli.validate_config(_train_cfg(tmp_path, eval_interval_secs=-1), training=False)
    with pytest.raises(ConfigError, match=r"bn_decay must be in \(0, 1\), got 1.5"):
        cli.validate_config(_train_cfg(tmp_path, bn_decay=1.5), training=False)


@pytest.mark.parametrize("name", configs.NAMES)
def test_shipped_configs_pass_validation(tmp_path, name):
    cfg = configs.get_config(name)
    cfg.dataset = "digits"  # the numbers are under test here, not the data directories
    cfg.output_dir = str(tmp_path)
    cli.validate_config(cfg, training=True)
    cli.validate_config(cfg, training=False)


# ---- --num_examples larger than the split -----------------------------------------------

def test_num_examples_larger_than_the_split_is_an_error(tmp_path):
    cfg = _train_cfg(tmp_path, num_examples=100000)
    with pytest.raises(ConfigError, match=r"num_examples=100000 is more than the 359 examples "
                       r"of the digits validation split"):
        cli.validate_config(cfg, training=False)
    cli.validate_config(_train_cfg(tmp_path, num_examples=359), training=False)
    cli.validate_config(_train_cfg(tmp_path, num_examples=-1), training=False)
    with pytest.raises(ValueError, match=r"num_examples=1438 is more than the 359 examples"):
        data.eval_iterator("digits", None, 8, 32, num_examples=1438)
    assert len(list(data.eval_iterator("digits", None, 8, 32, split="train",
                                       num_examples=1438))) == 1438 // 32


# ---- the command line: unknown or mistyped --config fields, short errors ----------------

def _parse_train_flags(monkeypatch, *argv):
    # ml_collections reads the --config.* overrides from sys.argv, not from the parsed list.
    argv = ["alp_jax.train", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    train_lib.define_flags(fv)
    cli.parse_flags(argv, fv)
    return fv


@pytest.mark.parametrize("argv,message", [
    ([f"--config={CONFIG}", "--config.foo=1"],
     r"^--config\.foo=1: the config has no field 'foo'; the fields are those of "
     r"alp_jax/config\.py default_config\(\)\.$"),
    ([f"--config={CONFIG}", "--config.batch_siz=16"],
     r"^--config\.batch_siz=16: the config has no field 'batch_siz' \(did you mean "
     r"'batch_size' or"),
    ([f"--config={CONFIG}", "--config.batch_size=abc"], r"config\.batch_size=abc: .*'abc'"),
    (["--config.batch_size=16"],
     r"^--config\.batch_size=16 overrides a field of a config file: pass "
     r"--config=NAME \(a shipped config, e\.g\. --config=digits_alp\) or "
     r"--config=path/to/my_config\.py before it\.$"),
    ([f"--config={CONFIG}", "--max_steps=-3"], r"^--max_steps=-3: max_steps must be >= -1"),
    ([f"--config={REPO}/configs/nope.py"],
     r"^--config: '.*/configs/nope\.py' is neither a shipped config nor an existing file; "
     r"the shipped configs: digits_baseline, digits_alp, "),
])
def test_bad_command_line_is_one_short_error(monkeypatch, argv, message):
    with pytest.raises(flags.Error) as err:
        _parse_train_flags(monkeypatch, *argv)
    assert re.search(message, str(err.value)), str(err.value)
    assert "\n" not in str(err.value)


def test_good_config_overrides_still_parse(monkeypatch):
    fv = _parse_train_flags(monkeypatch, f"--config={CONFIG}", "--config.batch_size=16",
                            "--config.learning_rate=0.5", "--max_steps=7")
    cfg = train_lib.config_from_flags(fv)
    assert (cfg.batch_size, cfg.learning_rate, cfg.max_steps) == (16, 0.5, 7)


@pytest.mark.parametrize("program,argv,message", [
    ("alp_jax.train", [f"--config={CONFIG}", "--config.foo=1"],
     "FATAL Flags parsing error: --config.foo=1: the config has no field 'foo'"),
    ("alp_jax.train", [f"--config={CONFIG}", "--config.log_every_steps=0"],
     "FATAL config error: log_every_steps must be >= 1, got 0."),
    ("alp_jax.train", ["--hparams=foo=1"], "FATAL config error: Unknown hparam 'foo'"),
    ("alp_jax.train", ["--hparams=label_smoothing=2"],
     "FATAL config error: label_smoothing must be in [0, 1), got 2.0."),
    ("alp_jax.eval", ["--eval_interval_secs=-1"],
     "FATAL Flags parsing error: --eval_interval_secs=-1: eval_interval_secs must be >= 0"),
])
def test_programs_print_a_short_error_not_a_traceback(tmp_path, program, argv, message):
    out = tmp_path / "never"
    where = f"--output_dir={out}" if program == "alp_jax.train" else f"--train_dir={out}"
    r = run_program(program, where, *argv, timeout=120)
    assert r.returncode == 1, r.stderr[-3000:]
    assert message in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) <= 3, r.stderr
    assert not out.exists()


# ---- the Tiny ImageNet converter: killed runs and full disks ----------------------------

_HANG = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import data_fixtures as fx
conv = fx.load_converter()
tree, out, mode, seed = sys.argv[2:6]

def hang():
    open(out + ".ready", "w").close()
    time.sleep(600)

if mode == "writing":
    real, calls = conv.make_example, []

    def make_example(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:  # 5 records into validation, train written
            hang()
        return real(*args, **kwargs)

    conv.make_example = make_example
else:  # killed right after the first output file got its final name
    real_replace = os.replace

    def replace(src, dst):
        real_replace(src, dst)
        if dst.endswith(".tfrecord"):
            hang()

    os.replace = replace
conv.convert(tree, out, seed=int(seed))
"""


def _converter():
    pytest.importorskip("tensorflow")
    pytest.importorskip("pandas")
    import data_fixtures as fx

    return fx, fx.load_converter()


def _kill_conversion(tree: str, out: str, mode: str, seed: int) -> None:
    import signal
    import time

    if os.path.exists(out + ".ready"):
        os.remove(out + ".ready")
    proc = subprocess.Popen([sys.executable, "-c", _HANG, os.path.dirname(__file__), tree, out,
                             mode, str(seed)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 240
        while not os.path.exists(out + ".ready"):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the conversion never reached the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _visible(out: str) -> list[str]:
    return sorted(f for f in os.listdir(out) if not f.startswith("."))


FINALS = ["test.tfrecord", "train.tfrecord", "validation.tfrecord"]


def _records(path: str) -> list[dict]:
    import tensorflow as tf

    def fields(record):
        feature = tf.train.Example.FromString(record.numpy()).features.feature
        return {k: list(v.bytes_list.value) or list(v.int64_list.value)
                for k, v in feature.items()}

    return [fields(r) for r in tf.data.TFRecordDataset(path)]


def test_killed_conversion_leaves_no_complete_looking_files_and_is_cleaned_up(tmp_path):
    fx, conv = _converter()
    tree = fx.write_tiny_imagenet_tree(str(tmp_path))
    out = str(tmp_path / "out")
    # Killed while writing: only hidden temporary files, removed by the next run.
    _kill_conversion(tree, out, "writing", 0)
    assert _visible(out) == []
    assert [f for f in os.listdir(out) if ".tmp-" in f], "the kill came too late to test"
    conv.convert(tree, out, seed=0)
    assert sorted(os.listdir(out)) == FINALS

    # Killed while giving the files their names, over an earlier conversion: the directory
    # never holds a full set mixing both conversions (train from one, validation from the
    # other); the files that are there are the new conversion's.
    _kill_conversion(tree, out, "renaming", 1)
    assert _visible(out) == ["train.tfrecord"]
    ref = str(tmp_path / "ref")
    conv.convert(tree, ref, seed=1)
    # Records, not bytes: protobuf map order differs between processes.
    assert _records(os.path.join(out, "train.tfrecord")) == \
        _records(os.path.join(ref, "train.tfrecord"))
    conv.convert(tree, out, seed=1)
    assert sorted(os.listdir(out)) == FINALS


def test_conversion_refuses_a_directory_another_conversion_is_writing(tmp_path):
    fx, conv = _converter()
    tree = fx.write_tiny_imagenet_tree(str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".train.tfrecord.tmp-{os.getppid()}"  # a process that is running
    live.write_bytes(b"")
    with pytest.raises(conv.ConversionError, match=rf"process {os.getppid()}, which is "
                       "running: another conversion is writing into"):
        conv.convert(tree, str(out))
    assert live.exists() and _visible(str(out)) == []


def test_conversion_on_a_full_disk_says_so_and_keeps_earlier_outputs(tmp_path, monkeypatch):
    import tensorflow as tf

    fx, conv = _converter()
    tree = fx.write_tiny_imagenet_tree(str(tmp_path))
    out = str(tmp_path / "out")
    conv.convert(tree, out, seed=0)
    before = {n: open(os.path.join(out, n), "rb").read() for n in FINALS}
    real, calls = conv.make_example, []

    def make_example(*args, **kwargs):  # what TFRecordWriter raises on ENOSPC (measured)
        calls.append(1)
        if len(calls) == 25:
            raise tf.errors.ResourceExhaustedError(None, None, "x; No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "make_example", make_example)
    with pytest.raises(conv.ConversionError, match=rf"Writing {re.escape(out)} failed: .*No "
                       r"space left on device.*earlier outputs are untouched"):
        conv.convert(tree, out, seed=1)
    assert sorted(os.listdir(out)) == FINALS
    assert {n: open(os.path.join(out, n), "rb").read() for n in FINALS} == before

    # Not enough free space for the outputs: said before anything is written.
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    small = tmp_path / "small"
    with pytest.raises(conv.ConversionError, match=r"need about [\d.]+ MB, but .*small has "
                       r"0\.0 MB free"):
        conv.convert(tree, str(small), seed=0)
    assert os.listdir(small) == []
