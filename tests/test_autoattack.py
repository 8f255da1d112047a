"""AutoAttack's standard version as a preset (``alp_jax.engine.autoattack``).

- the four specs and their parameters (AutoAttack's), targets capped at classes - 1;
- the cascade equals the AND of its four attacks run on every example (keys per example),
  and each attack runs only on the examples still robust (counted by wrapping the engine);
- the RobustBench-style JSON's fields; ``--attacks=autoattack`` accepted, a typo refused;
- on the session's digits model, the preset's worst case is no higher than the default
  suite's on the same examples.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from helpers import init_small_variables

import alp_jax
from alp_jax import checkpoints, engine, evaluator
from alp_jax import robustness as rb
from alp_jax.config import default_config
from alp_jax.engine import autoattack as aa
from alp_jax.engine import core

# Reduced counts for the toy model (the structure, order and targets stay AutoAttack's).
SMALL = {"apgd_iterations": 10, "fab_iterations": 10, "square_queries": 40}


def test_standard_specs_are_autoattacks():
    assert aa.standard_specs(8, 10) == ("apgdce_8_100", "apgddlr_8_100_t9", "fabt_8_100_t9",
                                        "square_8_5000")
    assert aa.standard_specs(16, 5)[1:3] == ("apgddlr_16_100_t4", "fabt_16_100_t4")
    with pytest.raises(ValueError, match="at least 4 classes"):
        aa.standard_specs(8, 3)
    assert aa.is_preset("autoattack") and aa.is_preset(" autoattack")
    assert not aa.is_preset("apgdce_16_100")


def _toy():
    """A small tanh MLP on 6x6x3 images: fast to compile, attackable but not trivially."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(108, 32)).astype(np.float32) * 0.2
    w2 = rng.normal(size=(32, 10)).astype(np.float32) * 0.8
    variables = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}

    def logits(v, x):
        return jnp.tanh(x.reshape(x.shape[0], -1) @ v["w1"]) @ v["w2"]

    x = rng.uniform(-1, 1, size=(40, 6, 6, 3)).astype(np.float32)
    y = np.array(jnp.argmax(logits(variables, jnp.asarray(x)), -1))
    y[:6] = (y[:6] + 1) % 10  # six examples misclassified clean: never attacked
    return logits, variables, x, y


@pytest.mark.slow
def test_cascade_is_the_and_of_its_attacks_and_skips_broken_examples(monkeypatch, tmp_path):
    logits, v, x, y = _toy()
    ran: list[tuple[tuple[str, ...], int]] = []
    real = core.evaluate_specs

    def counting(fn, variables, batches, specs, **kw):
        batches = list(batches)
        ran.append((tuple(specs), int(sum(b["mask"].sum() for b in batches))))
        return real(fn, variables, batches, specs, **kw)

    monkeypatch.setattr(core, "evaluate_specs", counting)
    batches = [{"images": x[i:i + 20], "labels": y[i:i + 20]} for i in range(0, 40, 20)]
    r = aa.evaluate_autoattack(logits, batches, [3, 6], variables=v, num_classes=10, **SMALL)
    monkeypatch.setattr(core, "evaluate_specs", real)
    s = r.suite
    assert int(s.clean_correct.sum()) == 34
    for e in (3, 6):
        stages = r.stages[e]
        assert [st.name for st in stages] == ["apgd-ce", "apgd-t", "fab-t", "square"]
        # Each attack ran on exactly the survivors of the ones before it.
        assert stages[0].attacked == 34
        for a, b in zip(stages, stages[1:], strict=False):
            assert b.attacked == a.robust_after
        for st in stages:
            if st.attacked:
                assert ((st.spec,), st.attacked) in ran
        assert stages[-1].robust_after == int(s.worst_correct(e).sum())
    # Attacks that succeed cut the later stages' work; the cascade has to do something here.
    assert r.stages[6][0].fooled > 0 and r.stages[6][1].attacked < 34
    # Per-example keys: the cascade equals every attack run on every example, ANDed.
    full = engine.evaluate_specs(logits, v, batches, list(s.grid.values()), num_classes=10)
    for e in (3, 6):
        w = full.correct["clean"].copy()
        for a in s.attacks:
            w &= full.correct[s.grid[(a, e)]]
        np.testing.assert_array_equal(w, s.worst_correct(e))
    with pytest.raises(ValueError, match="unknown counts"):
        aa.evaluate_autoattack(logits, batches, [3], variables=v, num_classes=10, niter=5)

    # The RobustBench-style summary the program writes, per eps.
    cfg = default_config()
    cfg.dataset, cfg.model_name, cfg.split_name = "digits", "toy_mlp", "validation"
    paths = evaluator.write_autoattack_summaries(str(tmp_path), r, cfg, "ckpt/400")
    with open(paths["autoattack_eps6.json"]) as f:
        js = json.load(f)
    assert set(js) >= {"model", "dataset", "threat_model", "eps", "eps_float", "n_examples",
                       "clean_acc", "autoattack_acc", "attacks", "code_version"}
    assert js["model"] == "ckpt/400" and js["dataset"] == "digits"
    assert js["threat_model"] == "Linf" and js["eps"] == "6/255" and js["n_examples"] == 40
    assert js["eps_float"] == pytest.approx(6 / 255)
    assert js["clean_acc"] == 85.0
    assert js["autoattack_acc"] == pytest.approx(round(100 * s.worst_accuracy(6), 2))
    assert [a["attack"] for a in js["attacks"]] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert [a["n_attacked"] for a in js["attacks"]] == [st.attacked for st in r.stages[6]]
    assert js["attacks"][-1]["robust_acc_after"] == js["autoattack_acc"]
    assert js["code_version"].startswith(alp_jax.__version__)


def test_preset_flag_is_accepted_and_a_typo_is_not(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    checkpoints.save_variables(ckpt, init_small_variables(), META)
    cfg = _flag_config([f"--checkpoint_path={ckpt}", f"--output_dir={tmp_path}",
                        "--attacks=autoattack"])
    assert cfg.robustness_attacks == "autoattack"
    with pytest.raises(ValueError, match="autoatack"):
        _flag_config([f"--checkpoint_path={ckpt}", f"--output_dir={tmp_path}",
                      "--attacks=autoatack"])


def _flag_config(argv):
    fv = flags.FlagValues()
    rb.define_flags(fv)
    fv(["prog", *argv])
    return rb.config_from_flags(fv)


META = {"model_name": "resnet_v2_small", "num_classes": 10, "config": {
    "dataset": "digits", "dataset_image_size": 16, "moving_average_decay": -1.0,
    "bounds": [-1.0, 1.0], "eval_batch_size": 16}}
N = 16
EPS = 8


@pytest.mark.slow
def test_preset_is_no_weaker_than_the_default_suite(trained_digits):
    """On the session's digits model at eps 8 (it has some robustness there), 16 examples.
    Counts: APGD 100 iterations and 9 targets as AutoAttack; FAB-T 20 iterations and
    Square 1,000 queries (AutoAttack: 100, 5,000) so that it shares the default suite's
    compiled APGD-CE and Square; weaker stages can only make this test harder to pass."""
    t = trained_digits
    batches = [{"images": t.val_images[:N], "labels": t.val_labels[:N]}]
    fn = engine.ModelLogits(t.model)
    r = aa.evaluate_autoattack(fn, batches, [EPS], variables=t.variables, num_classes=10,
                               fab_iterations=20, square_queries=1000)
    assert r.suite.attacks == ("apgdce_8_100", "apgddlr_8_100_t9", "fabt_8_20_t9",
                               "square_8_1000")
    default = engine.evaluate_suite(fn, batches, engine.DEFAULT_ATTACKS, [EPS],
                                    variables=t.variables, num_classes=10, num_images=0)
    acc = (r.robust_accuracy(EPS), default.worst_accuracy(EPS), default.clean_accuracy)
    assert 0 < acc[1] < acc[2], acc  # a real comparison: some examples break, some do not
    assert acc[0] <= acc[1], acc
    # The same spec with the same per-example keys: APGD-CE agrees with the default suite's.
    np.testing.assert_array_equal(r.suite.correct["apgdce_8_100"],
                                  default.clean_correct & default.correct["apgdce_8_100"])
