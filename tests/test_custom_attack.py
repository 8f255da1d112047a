"""A researcher's own attack family and objective, registered by one public call each.

The family defined here, ``ifgsm_EPS_STEP_NITER[_rK]`` (iterative FGSM on the true label
from a random start, K runs with the worst case per example), goes through the grammar,
the library, the engine's per-example keys, the masking probes and ``alp-robustness
--attack_modules`` (two devices). The README's example (``my_attacks.py``: FGSM and an
objective) is executed as written, training included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import program_env

from alp_jax import checkpoints, engine, objectives
from alp_jax.attacks import FAMILIES, common, grammar, register_family, register_modules
from alp_jax.engine import core
from alp_jax.losses import softmax_cross_entropy
from alp_jax.pgd import pixel_scale, signed_gradient_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
N = 32


def ifgsm(logits_fn, images, key, spec, *, bounds, random_start, labels):
    """Iterative FGSM up the true label's cross-entropy, ``spec.restarts`` runs."""
    scale = pixel_scale(bounds)
    eps, step = spec.eps * scale, spec.step * scale
    x0 = jax.lax.stop_gradient(images)
    objective = lambda x: jnp.sum(softmax_cross_entropy(logits_fn(x), labels))

    def one_run(_, run_key, use_random):
        x = common.start(run_key, x0, eps, bounds, use_random)
        return signed_gradient_loop(objective, x, x0, eps, step, spec.niter, bounds, 1.0)

    x = common.worst_case_runs(one_run, logits_fn, x0, labels, key, spec.restarts,
                               spec.restarts, random_start)
    return jax.lax.stop_gradient(x)


IFGSM = {"fields": ("EPS", "STEP", "NITER"), "suffixes": "r", "label": "true"}


@contextlib.contextmanager
def _restored_tables():
    """Leaves the attack and objective tables as they were: a registration cannot be
    undone by the public API (on purpose), and other test files list every family."""
    families, registry = dict(grammar._FAMILIES), dict(objectives._REGISTRY)
    try:
        yield
    finally:
        grammar._FAMILIES.clear()
        grammar._FAMILIES.update(families)
        objectives._REGISTRY.clear()
        objectives._REGISTRY.update(registry)


@pytest.fixture(scope="module")
def family():
    with _restored_tables():
        assert "ifgsm" not in FAMILIES  # nothing registered it on import
        register_family("ifgsm", run=ifgsm, **IFGSM)
        yield


@pytest.fixture(scope="module")
def trained_logits(trained_digits):
    x, y = (jnp.asarray(a[:N]) for a in (trained_digits.val_images, trained_digits.val_labels))
    return trained_digits.model, trained_digits.variables, x, y


# ---- registration and the grammar (no model) ----------------------------------------------

def test_registration_refuses_taken_names_and_bad_layouts(family):
    del family
    with pytest.raises(ValueError, match=r"'ifgsm' is already taken \(ifgsm_EPS_STEP_NITER"):
        register_family("ifgsm", run=ifgsm, **IFGSM)
    with pytest.raises(ValueError, match="'pgd' is already taken"):
        register_family("pgd", fields=("EPS",), run=ifgsm)
    for bad, why in [
        ({"name": "my_fgsm"}, "got 'my_fgsm'"),
        ({"name": "clean"}, "got 'clean'"),
        ({"fields": ("STEP", "EPS")}, "fields ('STEP', 'EPS') is not a layout"),
        ({"suffixes": "rt"}, "suffixes 'rt' is not one of"),
        ({"label": "target"}, "label 'target' is not one of"),
        ({"run": "no_colon"}, "run must be a callable or a 'module:function'"),
    ]:
        kw = {"name": "fgsmx", "fields": ("EPS",), "run": ifgsm, **bad}
        with pytest.raises(ValueError, match=re.escape(why)):
            register_family(kw.pop("name"), **kw)
    assert "fgsmx" not in FAMILIES
    with pytest.raises(TypeError):  # the table is read-only: register_family adds to it
        FAMILIES["fgsmx"] = FAMILIES["pgd"]
    with pytest.raises(TypeError):  # keyword arguments only, as register_objective
        register_family("fgsmx", ("EPS",), ifgsm)
    with pytest.raises(TypeError):
        objectives.register_objective("mine", objectives.alp_objective)
    with pytest.raises(ValueError, match="'alp' is already taken"):
        objectives.register_objective("alp", factory=objectives.alp_objective)


def test_a_registered_spec_parses_formats_rescales_and_seeds_like_a_built_in(family):
    del family
    s = grammar.parse_attack("ifgsm_16_4_10_r3")
    assert (s.method, s.eps, s.step, s.niter, s.restarts, s.label) == (
        "ifgsm", 16, 4, 10, 3, "true")
    assert grammar.format_spec(s) == s.spec == "ifgsm_16_4_10_r3"
    assert grammar.canonical("ifgsm_16_4_10_r1") == "ifgsm_16_4_10"
    assert grammar.with_eps(s, 8).spec == "ifgsm_8_2_10_r3"  # STEP keeps its ratio
    assert grammar.template(s).spec == "ifgsm_EPS_STEP_10_r3"
    assert grammar.seed_name(s) == "ifgsm_16_4_10"  # _rK shares the 1-run randomness
    assert grammar.seed_index(s) == grammar.seed_index("ifgsm_16_4_10")
    assert "ifgsm_EPS_STEP_NITER[_rK]" in grammar.valid_forms()
    with pytest.raises(ValueError, match=r"'ifgsm_16_4'.*expected ifgsm_EPS_STEP_NITER"):
        grammar.parse_attack("ifgsm_16_4")
    # The masking probes vary a registered PGD-like family's NITER and restarts.
    probes = engine.default_probes(["square_16_100", "ifgsm_16_4_10_r3"])
    assert (probes.base, probes.more_iterations, probes.more_restarts) == (
        "ifgsm_16_4_10", "ifgsm_16_4_40", "ifgsm_16_4_10_r3")


def test_register_modules_loads_a_module_and_names_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "attacks_by_ref.py").write_text(
        "from alp_jax.attacks import register_family\n"
        "def register():\n"
        "    register_family('refpgd', fields=('EPS', 'STEP', 'NITER'), suffixes='r',\n"
        "                    run='alp_jax.attacks.restarts:run', label='true')\n")
    (tmp_path / "no_register.py").write_text("X = 1\n")
    with _restored_tables():
        assert register_modules(["attacks_by_ref", " attacks_by_ref"]) == ["attacks_by_ref"]
        # A "module:function" run is imported when a spec of it first runs.
        x = jnp.zeros((2, 4, 4, 3))
        logits = lambda z: jnp.reshape(z, (z.shape[0], -1))[:, :10]
        adv = grammar.generate_adversarial_examples(logits, x, jax.random.PRNGKey(0),
                                                    "refpgd_8_2_3", labels=jnp.array([0, 1]))
        assert adv.shape == x.shape and float(jnp.max(jnp.abs(adv))) <= 8 * 2 / 255 + 1e-6
        with pytest.raises(ValueError, match="'no_register' has no register"):
            register_modules(["no_register"])
        with pytest.raises(ValueError, match="cannot import 'not_a_module_here'"):
            register_modules(["not_a_module_here"])
        with pytest.raises(ValueError, match="'a b' is not a module name"):
            register_modules(["a b"])
        register_family("badref", fields=("EPS",), run="not_a_module_here:run")
        with pytest.raises(ValueError, match="attack family 'badref': cannot load"):
            grammar.generate_adversarial_examples(logits, x, jax.random.PRNGKey(0), "badref_8")
    assert "refpgd" not in FAMILIES


# ---- the library and the engine on the trained digits model -------------------------------

@pytest.mark.slow
def test_library_and_engine_run_a_registered_family_with_per_example_keys(family,
                                                                          trained_logits):
    del family
    model, variables, x, y = trained_logits
    logits_fn = lambda z: model.apply(variables, z, train=False)
    spec, seed = "ifgsm_16_4_3_r2", 7
    # The engine: example i attacked alone with fold_in(fold_in(PRNGKey(seed),
    # seed_index(spec)), i), as for the built-in families.
    r = engine.evaluate_specs(core.ModelLogits(model), variables,
                              [{"images": np.asarray(x), "labels": np.asarray(y)}],
                              [spec], num_classes=10, seed=seed)
    base = jax.random.fold_in(jax.random.PRNGKey(seed), grammar.seed_index(spec))
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(N))
    adv = jax.jit(lambda: grammar.generate_per_example(logits_fn, x, keys, spec, labels=y))()
    np.testing.assert_array_equal(
        r.correct[spec], np.asarray(jnp.argmax(logits_fn(adv), -1) == y))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(jnp.max(jnp.abs(adv - x))) <= 16 * 2 / 255 + 1e-5
    assert float(jnp.min(adv)) >= -1 and float(jnp.max(adv)) <= 1
    assert r.correct[spec].mean() < r.correct["clean"].mean() - 0.3  # an undefended model


# ---- the README's example and the program ------------------------------------------------

def _readme_blocks() -> tuple[str, str, dict[str, list[str]]]:
    """(my_attacks.py, its use, {program: its arguments}) from the README."""
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index("### Your own attack family"):]
    module, use = re.findall(r"```python\n(.*?)```", section, re.S)[:2]
    block = re.search(r"```\n(PYTHONPATH=. alp-train.*?)```", section, re.S).group(1)
    commands = {}
    for line in block.replace("\\\n", " ").splitlines():
        env, program, *args = shlex.split(line)
        assert env == "PYTHONPATH=.", line
        commands[program] = args
    return module, use, commands


@pytest.mark.slow
def test_readme_example_registers_trains_and_attacks(tmp_path, monkeypatch, trained_digits):
    module, use, _ = _readme_blocks()
    (tmp_path / "my_attacks.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_attacks", raising=False)
    x, y = (jnp.asarray(a[:8]) for a in (trained_digits.val_images, trained_digits.val_labels))
    with _restored_tables():
        import my_attacks  # noqa: F401 - importing registers nothing

        assert "fgsm" not in FAMILIES and "adversarial_only" not in objectives._REGISTRY
        scope = {"images16": x, "labels": y}
        exec(compile(use, "README.md", "exec"), scope)  # noqa: S102 - the documented example
        assert int(scope["state"].step) == 1
        metrics = scope["metrics"]
        assert {"loss_xent", "adv_accuracy"} <= set(metrics)
        assert np.isfinite(metrics["total_loss"])
        adv = scope["adv"]
        assert float(jnp.max(jnp.abs(adv - x))) == pytest.approx(16 * 2 / 255, abs=1e-5)
        assert grammar.with_eps("fgsm_16", 8).spec == "fgsm_8"
        with pytest.raises(ValueError, match="'fgsm' is already taken"):
            my_attacks.register()


@pytest.mark.slow
def test_program_runs_registered_families_on_two_devices(family, trained_digits, tmp_path):
    """``alp-robustness --attack_modules`` with the README's module and this file's family
    (a ``module:function`` reference), sharded over two devices; the masking probes and
    the large-eps check use the registered families."""
    del family
    module, _, commands = _readme_blocks()
    command = commands["alp-robustness"]
    assert "--attack_modules=my_attacks" in command
    assert any(a.startswith("--attacks=fgsm_16") for a in command), command
    (tmp_path / "my_attacks.py").write_text(module)
    (tmp_path / "test_family.py").write_text(
        "from alp_jax.attacks import register_family\n"
        "def register():\n"
        f"    register_family('ifgsm', run='test_custom_attack:ifgsm', **{IFGSM!r})\n")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    meta = {"model_name": "resnet_v2_small", "num_classes": 10, "config": {
        "dataset": "digits", "dataset_image_size": 16, "moving_average_decay": -1.0,
        "bounds": [-1.0, 1.0], "eval_batch_size": 16}}
    checkpoints.save_variables(ckpt, jax.device_get(trained_digits.variables), meta)
    env = program_env(2, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), TESTS, os.environ.get("PYTHONPATH", "")]).strip(os.pathsep))
    r = subprocess.run(
        [sys.executable, "-m", "alp_jax.robustness", "--attack_modules=my_attacks,test_family",
         f"--checkpoint_path={ckpt}", f"--output_dir={out}",
         "--attacks=fgsm_16,ifgsm_16_4_2_r2", "--eps=8,16", "--large_eps_attack=fgsm_128",
         f"--num_examples={N}", "--num_images=0"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        js = json.load(f)
    assert js["attacks"] == ["fgsm_16", "ifgsm_16_4_2_r2"] and js["num_examples"] == N
    assert js["provenance"]["device_count"] == 2
    assert js["probes"] == {"large_eps": "fgsm_128", "base": "ifgsm_16_4_2",
                            "more_iterations": "ifgsm_16_4_8",
                            "more_restarts": "ifgsm_16_4_2_r2"}
    checks = {c["name"]: c for c in js["masking_checks"]}
    assert "fgsm_128" in checks["large_eps"]["detail"]
    # Each check ran on the registered families (whether 2 iterations cover the 8-iteration
    # probe is the model's business, not this test's).
    assert all(checks[c]["passed"] is not None for c in (
        "large_eps", "more_iterations", "more_restarts", "monotone_in_eps",
        "suite_covers_probes"))
    assert checks["more_restarts"]["passed"]  # same keys as one run: can only fool more
    assert {row["spec"] for row in js["results"]} >= {"fgsm_8", "fgsm_16", "ifgsm_8_2_2_r2",
                                                      "ifgsm_16_4_2_r2"}
    assert js["worst_case"]["16"] < js["clean_accuracy"] - 0.3


@pytest.mark.slow
def test_training_and_eval_programs_take_the_family_by_flag(tmp_path):
    """The README's ``alp-train`` command (3 steps on 8x8 digits instead of the config's
    length) trains on ``fgsm_16`` with the ``adversarial_only`` objective; ``alp-eval``
    then evaluates that checkpoint against ``fgsm_8``. Without the flag, the program ends
    in one line naming the unknown spec."""
    module, _, commands = _readme_blocks()
    (tmp_path / "my_attacks.py").write_text(module)
    env = program_env(None, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]).strip(os.pathsep))
    out = str(tmp_path / "run")
    args = [a for a in commands["alp-train"] if not a.startswith("--output_dir=")]
    assert "--attack_modules=my_attacks" in args
    assert "--config.train_adv_method=fgsm_16" in args

    def run(module_name, *argv):
        return subprocess.run([sys.executable, "-m", module_name, *argv], cwd=str(tmp_path),
                              env=env, capture_output=True, text=True, timeout=600)

    no_flag = run("alp_jax.train", *(a for a in args if "attack_modules" not in a),
                  f"--output_dir={out}", "--config.max_steps=3")
    assert no_flag.returncode == 1
    last = no_flag.stderr.strip().splitlines()[-1]
    assert last.startswith("FATAL config error:") and "fgsm_16" in last, last
    assert "Traceback" not in no_flag.stderr

    r = run("alp_jax.train", *args, f"--output_dir={out}", "--config.max_steps=3",
            "--config.dataset_image_size=8", "--config.batch_size=16")
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoints.steps(out) == [3]
    meta = checkpoints.read_meta(checkpoints.resolve(out))
    assert meta["config"]["train_adv_method"] == "fgsm_16"
    assert meta["config"]["train_objective"] == "adversarial_only"
    assert "objective adversarial_only" in r.stderr and "attack fgsm_16" in r.stderr

    e = run("alp_jax.eval", "--attack_modules=my_attacks", f"--checkpoint_path={out}",
            "--adv_method=fgsm_8", "--num_examples=32",
            "--hparams=eval_batch_size=16")
    assert e.returncode == 0, e.stderr[-3000:]
    assert re.search(r"step 3, fgsm_8 on digits/validation: top-1 [\d.]+, top-5 [\d.]+ "
                     r"\(32 examples\)", e.stderr), e.stderr[-2000:]
