"""The shipped configs (alp_jax/configs): families x objective variants, selectable by name.

Every shipped name loads and passes validation, each variant changes exactly its row of the
variant table, ``--config=NAME`` on the command line is the same config as the file
spelling ``--config=.../digits.py:alp``, and a bad or old-style value is one short error.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from absl import flags

from alp_jax import cli, configs
from alp_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "alp_jax")
DIGITS = os.path.join(PACKAGE, "configs", "digits.py")


def _parse(monkeypatch, *argv: str) -> flags.FlagValues:
    # ml_collections reads the --config.* override names from sys.argv.
    argv = ("alp_jax.train", *argv)
    monkeypatch.setattr(sys, "argv", list(argv))
    fv = flags.FlagValues()
    train_lib.define_flags(fv)
    cli.parse_flags(list(argv), fv)
    return fv


def test_names_are_every_family_with_every_variant():
    assert configs.NAMES == tuple(f"{f}_{v}" for f in configs.FAMILIES for v in configs.VARIANTS)
    assert set(configs.FAMILIES) == {"digits", "imagenet64", "tiny_imagenet"}
    assert set(configs.VARIANTS) == {"baseline", "alp", "clp", "lsq", "trades"}
    assert len(configs.NAMES) == 15 and "tiny_imagenet_trades" in configs.NAMES


@pytest.mark.parametrize("name", configs.NAMES)
def test_every_shipped_config_loads_and_passes_validation(tmp_path, name):
    cfg = configs.get_config(name)
    family, variant = name.rsplit("_", 1)
    module = __import__(f"alp_jax.configs.{family}", fromlist=["get_config"])
    assert module.get_config(variant).to_dict() == cfg.to_dict()
    if cfg.dataset != "digits":
        pytest.importorskip("tensorflow")  # the ImageNet / Tiny ImageNet readers need it
        field = "tiny_imagenet_data_dir" if cfg.dataset == "tiny_imagenet" else "imagenet_data_dir"
        (tmp_path / "data").mkdir()
        cfg[field] = str(tmp_path / "data")
    cfg.output_dir = str(tmp_path / "run")
    cli.validate_config(cfg, training=True)
    assert configs.get_config(name).output_dir == ""  # a fresh config each call


# Today's values of the configs before they became families (configs/*.py).
FAMILY_FIELDS = {
    "digits": {"dataset": "digits", "dataset_image_size": 16, "model_name": "resnet_v2_small",
               "batch_size": 64, "learning_rate": 0.02, "lr_num_epochs_per_decay": 4.0,
               "moving_average_decay": 0.999, "bn_decay": 0.9, "max_steps": 400,
               "save_model_steps": 200, "save_summaries_steps": 50, "log_every_steps": 50,
               "eval_batch_size": 64},
    "imagenet64": {"model_name": "resnet_v2_50", "dataset": "imagenet",
                   "dataset_image_size": 64, "train_adv_method": "clean",
                   "train_lp_weight": 0.0},
    "tiny_imagenet": {"model_name": "resnet_v2_50", "dataset": "tiny_imagenet",
                      "dataset_image_size": 64, "learning_rate": 0.02,
                      "finetune_exclude_pretrained_scopes": "resnet_v2_50/logits",
                      "finetune_trainable_scopes": "resnet_v2_50/logits,resnet_v2_50/postnorm"},
}
# (variant, field, value) as configs/digits_{alp,clp,lsq,trades}.py and the others set them.
VARIANT_VALUES = [
    ("alp", "train_adv_method", "pgdll_16_2_10"), ("alp", "train_lp_weight", 0.5),
    ("clp", "train_objective", "clp"), ("clp", "objective_weight", 0.5),
    ("lsq", "train_objective", "lsq"), ("lsq", "objective_weight", 0.05),
    ("trades", "train_objective", "trades"), ("trades", "train_adv_method", "pgd_16_2_10"),
    ("trades", "objective_weight", 6.0),
]


def test_the_variant_table_holds_the_shipped_values():
    table: dict[str, dict] = {"baseline": {}}
    for variant, field, value in VARIANT_VALUES:
        table.setdefault(variant, {})[field] = value
    assert configs.VARIANTS == table


@pytest.mark.parametrize("family", configs.FAMILIES)
def test_family_baseline_is_default_config_with_the_family_fields(family):
    from alp_jax.config import default_config

    base = configs.get_config(f"{family}_baseline").to_dict()
    default = default_config().to_dict()
    assert {k: v for k, v in base.items() if default[k] != v} == {
        k: v for k, v in FAMILY_FIELDS[family].items() if default[k] != v}
    assert all(base[k] == v for k, v in FAMILY_FIELDS[family].items())
    assert set(base) == set(default)


@pytest.mark.parametrize("name", configs.NAMES)
def test_each_variant_differs_from_its_baseline_exactly_in_its_fields(name):
    family, variant = name.rsplit("_", 1)
    base = configs.get_config(f"{family}_baseline").to_dict()
    cfg = configs.get_config(name).to_dict()
    assert set(cfg) == set(base)
    changed = {k: v for k, v in cfg.items() if base[k] != v}
    table = configs.VARIANTS[variant]
    # Every field of the row is set; those the baseline already has are not a difference.
    assert all(cfg[k] == v and type(cfg[k]) is type(v) for k, v in table.items()), name
    assert changed == {k: v for k, v in table.items() if base[k] != v}, name
    assert variant == "baseline" or changed, name


def test_unknown_variant_and_name_are_value_errors_naming_them():
    from alp_jax.configs import digits, imagenet64, tiny_imagenet

    for module in (digits, imagenet64, tiny_imagenet):
        with pytest.raises(ValueError, match=r"Unknown config variant 'alpp'; valid: baseline, "
                           r"alp, clp, lsq, trades\.$"):
            module.get_config("alpp")
        assert module.get_config().to_dict() == module.get_config("baseline").to_dict()
    with pytest.raises(ValueError, match=r"Unknown config 'digits_alpp'; the shipped configs: "
                       r"digits_baseline, digits_alp, .*tiny_imagenet_trades\.$"):
        configs.get_config("digits_alpp")


def test_resolve():
    assert configs.resolve("digits_alp") == f"{DIGITS}:alp"
    assert configs.resolve("tiny_imagenet_baseline") == (
        os.path.join(PACKAGE, "configs", "tiny_imagenet.py") + ":baseline")
    assert os.path.isabs(configs.resolve("imagenet64_trades"))
    for arg in (DIGITS, f"{DIGITS}:clp", __file__, f"{__file__}:anything"):
        assert configs.resolve(arg) == arg  # existing files pass through
    with pytest.raises(ValueError, match=r"^'nope' is neither a shipped config nor an existing "
                       r"file; the shipped configs: digits_baseline, .*tiny_imagenet_trades; or "
                       r"pass the path of your own config file \(--config=path/to/my_config\.py"
                       r"\)\.$"):
        configs.resolve("nope")
    with pytest.raises(ValueError, match=r"^'configs/digits_alp\.py' is not a file: the shipped "
                       r"configs are now named, e\.g\. --config=digits_alp \(file spelling: "
                       r"alp_jax/configs/digits\.py:alp\); the shipped configs: digits_baseline"):
        configs.resolve("configs/digits_alp.py")
    with pytest.raises(ValueError, match=r"--config=tiny_imagenet_lsq \(file spelling: "
                       r"alp_jax/configs/tiny_imagenet\.py:lsq\)"):
        configs.resolve("/old/checkout/configs/tiny_imagenet_lsq.py")
    with pytest.raises(ValueError, match=r"unknown variant 'nope' of the family digits; valid: "
                       r"baseline, alp"):
        configs.resolve(f"{DIGITS}:nope")


# ---- the command line -------------------------------------------------------------------

def test_config_name_on_the_command_line_is_the_file_spelling(monkeypatch):
    by_name = _parse(monkeypatch, "--config=digits_alp").config.to_dict()
    by_path = _parse(monkeypatch, f"--config={DIGITS}:alp").config.to_dict()
    assert by_name == by_path == configs.get_config("digits_alp").to_dict()
    assert by_name["train_adv_method"] == "pgdll_16_2_10"
    # --config NAME and -config=NAME too; the relative file spelling from the checkout.
    assert _parse(monkeypatch, "--config", "digits_alp").config.to_dict() == by_name
    assert _parse(monkeypatch, "-config=digits_alp").config.to_dict() == by_name
    monkeypatch.chdir(REPO)
    assert _parse(monkeypatch, "--config=alp_jax/configs/digits.py:alp").config.to_dict() == \
        by_name
    assert _parse(monkeypatch, "--config=alp_jax/configs/digits.py").config.to_dict() == \
        configs.get_config("digits_baseline").to_dict()


def test_overrides_apply_to_a_named_config(monkeypatch):
    fv = _parse(monkeypatch, "--config=digits_alp", "--config.batch_size=7")
    assert fv.config.batch_size == 7
    assert fv.config.train_adv_method == "pgdll_16_2_10"
    fv = _parse(monkeypatch, "--config", "tiny_imagenet_trades", "--config.batch_size=7",
                "--config.objective_weight=2.0")
    assert (fv.config.batch_size, fv.config.objective_weight) == (7, 2.0)
    assert fv.config.train_objective == "trades"
    with pytest.raises(flags.Error, match=r"^--config\.batch_siz=7: the config has no field "
                       r"'batch_siz' \(did you mean 'batch_size'"):
        _parse(monkeypatch, "--config", "digits_alp", "--config.batch_siz=7")


@pytest.mark.parametrize("argv,message", [
    (["--config=nope"], r"^--config: 'nope' is neither a shipped config nor an existing file; "
     r"the shipped configs: digits_baseline, digits_alp, .*tiny_imagenet_trades; or pass the "
     r"path of your own config file \(--config=path/to/my_config\.py\)\.$"),
    (["--config", "digits_alpp", "--config.batch_size=7"], r"^--config: 'digits_alpp' is "
     r"neither a shipped config"),
    (["--config=configs/digits_alp.py"], r"^--config: 'configs/digits_alp\.py' is not a file: "
     r"the shipped configs are now named, e\.g\. --config=digits_alp \(file spelling: "
     r"alp_jax/configs/digits\.py:alp\); the shipped configs: digits_baseline, "),
    ([f"--config={DIGITS}:alpp"], r"^--config: '.*digits\.py:alpp': unknown variant 'alpp' of "
     r"the family digits; valid: baseline, alp, clp, lsq, trades\.$"),
])
def test_bad_config_values_are_one_short_flags_error(monkeypatch, argv, message):
    with pytest.raises(flags.Error, match=message) as err:
        _parse(monkeypatch, *argv)
    assert len(str(err.value).splitlines()) == 1  # one line, no traceback


def test_own_config_file_by_path(monkeypatch, tmp_path):
    own = tmp_path / "my_config.py"
    own.write_text("from alp_jax.configs import digits\n\n\n"
                   "def get_config(arg='16'):\n"
                   "    c = digits.get_config('lsq')\n"
                   "    c.dataset_image_size = int(arg)\n"
                   "    return c\n")
    cfg = _parse(monkeypatch, f"--config={own}:8", "--config.batch_size=5").config
    assert (cfg.dataset_image_size, cfg.batch_size, cfg.train_objective) == (8, 5, "lsq")
    # An existing file that fails to load (here: reading a missing file) is one line too.
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config():\n    return open('/nonexistent/data.txt')\n")
    with pytest.raises(flags.Error, match=r"^--config: the file could not be loaded \(.*No such "
                       r"file.*\); the shipped configs are named, e\.g\. --config=digits_alp\.$"):
        _parse(monkeypatch, f"--config={broken}")


def test_override_without_config_names_the_new_spelling(monkeypatch):
    with pytest.raises(flags.Error, match=r"^--config\.batch_size=3 overrides a field of a config "
                       r"file: pass --config=NAME \(a shipped config, e\.g\. --config=digits_alp\) "
                       r"or --config=path/to/my_config\.py before it\.$"):
        _parse(monkeypatch, "--config.batch_size=3")


def test_config_help_names_the_families_and_variants():
    fv = flags.FlagValues()
    train_lib.define_flags(fv)
    text = " ".join(fv["config"].help.split())
    assert "digits, imagenet64, tiny_imagenet" in text
    assert "baseline, alp, clp, lsq, trades" in text and "digits_alp" in text
    assert "configs/NAME.py" not in text


# ---- the package ------------------------------------------------------------------------

def test_no_module_edits_sys_path():
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    if "sys.path.insert" in f.read():
                        offenders.append(os.path.relpath(path, REPO))
    assert offenders == []


def test_configs_import_without_ml_collections():
    # The library's pure parts import where ml_collections is not installed.
    code = ("import sys; sys.modules['ml_collections'] = None\n"
            "import alp_jax.configs as c\n"
            "assert c.resolve('digits_alp').endswith('digits.py:alp')\n"
            "print(len(c.NAMES))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "15", r.stderr[-2000:]
