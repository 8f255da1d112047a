"""Installing alp-jax where JAX is already installed keeps that JAX.

Colab and clusters come with a JAX built for their accelerator; an install that upgrades
jax/jaxlib can break it. The README's and the notebook's install command pins the JAX that
is there (``pip install alp-jax "jax==V" "jaxlib==V"``), so pip picks flax, optax and orbax
releases that work with it. This test builds a virtualenv with the oldest supported
jax/jaxlib (``constraints-lower.txt``), installs the checkout (not editable) with that
command, checks that ``jax.__version__`` did not change, and trains the shipped config
``digits_alp`` (``--config=digits_alp``, read from the installed wheel's ``alp_jax/configs``)
for two steps with the installed ``alp-train``, outside the checkout.

About two minutes with a warm pip cache (it downloads jax/jaxlib once otherwise); needs the
package index.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import program_env

REPO = Path(__file__).resolve().parents[1]


def lower_bound(name: str) -> str:
    """The version ``constraints-lower.txt`` pins for ``name``."""
    text = (REPO / "constraints-lower.txt").read_text()
    match = re.search(rf"^{re.escape(name)}==(\S+)", text, re.MULTILINE)
    assert match, f"constraints-lower.txt pins no {name}"
    return match.group(1)


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_install_keeps_a_preinstalled_jax_and_trains(tmp_path: Path) -> None:
    jax_v, jaxlib_v = lower_bound("jax"), lower_bound("jaxlib")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, f"jax=={jax_v}", f"jaxlib=={jaxlib_v}"])  # the environment's own JAX
    _run([*pip, str(REPO), f"jax=={jax_v}", f"jaxlib=={jaxlib_v}"])  # the README's command
    versions = _run([py, "-c", "import jax, jaxlib, flax, alp_jax, alp_jax.configs as c; "
                     "print(jax.__version__, jaxlib.__version__, alp_jax.__file__, "
                     "c.resolve('digits_alp'))"], cwd=tmp_path).stdout.split()
    assert versions[:2] == [jax_v, jaxlib_v], versions
    assert str(REPO) not in versions[2], "the test must run the installed package"
    # The shipped configs are in the wheel: the name resolves to the installed file.
    assert versions[3].endswith("alp_jax/configs/digits.py:alp"), versions
    assert str(REPO) not in versions[3] and os.path.isfile(versions[3].rsplit(":", 1)[0])

    out = tmp_path / "run"
    env = program_env(None, JAX_PLATFORMS="cpu")
    # The shipped config by name, its attack (pgdll_16_2_10) as shipped; smaller images and
    # batches, and logs and summaries every step, keep two steps quick.
    r = _run([str(venv / "bin" / "alp-train"), "--config=digits_alp", "--config.max_steps=2",
              "--config.save_model_steps=0", f"--output_dir={out}",
              "--config.dataset_image_size=8", "--config.batch_size=16",
              "--config.log_every_steps=1", "--config.save_summaries_steps=1"],
             cwd=tmp_path, env=env)
    assert "Compiled the train step" in r.stderr and "step 2/2" in r.stderr, r.stderr[-3000:]
    assert (out / "checkpoints" / "2").is_dir()
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["train_adv_method"], cfg["train_lp_weight"]) == ("pgdll_16_2_10", 0.5), cfg
    assert (cfg["model_name"], cfg["bn_decay"]) == ("resnet_v2_small", 0.9)  # digits family's
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["provenance"]["packages"]["jax"] == jax_v
    assert first["provenance"]["revision"] is None or "commit" in first["provenance"]["revision"]
