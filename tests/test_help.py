"""``--help`` of each program lists its flags, each with its meaning and its default.

absl lists only the key flags of the module it takes as the main one; a console script's
wrapper defines none, so ``alp-train --help`` used to print a bare usage line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = {
    "alp-train": ("alp_jax.train", ["config", "hparams", "dataset", "multihost", "output_dir",
                                    "max_steps", "model_name", "finetune_checkpoint_path"]),
    "alp-eval": ("alp_jax.eval", ["config", "checkpoint_path", "train_dir", "adv_method",
                                  "eval_once", "num_examples", "dataset", "multihost"]),
    "alp-robustness": ("alp_jax.robustness", ["checkpoint_path", "output_dir", "attacks", "eps",
                                              "num_examples", "attack_seed", "config",
                                              "multihost"]),
}
FLAG = re.compile(r"^  --(?:\[no\])?(\w+): (.*?)(?=^  --|^\S|\Z)", re.MULTILINE | re.DOTALL)


def _help(argv: list[str]) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=120, env=env,
                       cwd="/")  # outside the checkout, as an installed user runs it
    assert r.returncode in (0, 1), r.stderr[-2000:]  # absl's --help exits 1 after printing
    return r.stdout


def _check(text: str, key_flags: list[str]) -> None:
    listed = {m.group(1): " ".join(m.group(2).split()) for m in FLAG.finditer(text)}
    missing = [f for f in key_flags if f not in listed]
    assert not missing, f"--help does not list {missing}:\n{text[:3000]}"
    for name, body in listed.items():
        # absl's "(default: X)", or the flag's own "(default X, ...)" where it says more.
        assert re.search(r"\(default[: ]", body), f"--{name} states no default: {body!r}"
        assert len(re.split(r"\(default", body)[0].strip()) > 5, f"--{name} has no meaning"
    assert "helpfull" in text and "USAGE" not in text.split("flags:")[0][:20]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help_lists_key_flags(script: str) -> None:
    path = Path(sys.executable).parent / script
    if not path.exists():
        pytest.skip(f"{script} is not installed next to {sys.executable}")
    text = _help([str(path)])
    _check(text, SCRIPTS[script][1])
    # The usage text is the program's docstring, not absl's bare "USAGE: prog [flags]".
    assert f"python -m {SCRIPTS[script][0]}" in text.split("flags:")[0]


def test_module_help_lists_shared_flags() -> None:
    """``python -m alp_jax.train --help`` lists the shared flags too, not only its own."""
    text = _help([sys.executable, "-m", "alp_jax.train"])
    _check(text, SCRIPTS["alp-train"][1])
    assert "default_config(): 'resnet_v2_50'" in " ".join(text.split())
