"""Runs ``examples/quickstart.ipynb`` top to bottom (shortened) and checks what it reports.

The notebook's run-length cell (tagged ``parameters``, as papermill does) is replaced by a
shorter one: 60 training steps instead of 200, and 64 validation examples instead of 359 for
the PGD attacks, the curves and the suite (before 2026-12-07 the PGD attacks and curves ran
on all 359, 27 s of the run); everything else
(the install cell, the attacks, the checkpoint, the suite, the plots, the baseline) runs as a
user sees it, from a working directory outside the checkout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from helpers import program_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
STEPS = 60
SUITE_EXAMPLES = 64
EVAL_EXAMPLES = 64
RESULT = re.compile(r"^RESULT clean=([0-9.]+) pgd=([0-9.]+) worst16=([0-9.]+)", re.MULTILINE)


def parameters_cell(nb) -> int:
    """The index of the one cell tagged ``parameters`` (the run length)."""
    found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged 'parameters', got {found}"
    return found[0]


def _starts_this_python(argv0: str) -> bool:
    """Whether a kernelspec's ``argv[0]`` launches ``sys.executable``."""
    # jupyter_client replaces a bare python / pythonX / pythonX.Y by sys.executable.
    major, minor = sys.version_info[:2]
    if argv0 in {"python", f"python{major}", f"python{major}.{minor}"}:
        return True
    path = shutil.which(argv0)
    return path is not None and os.path.samefile(path, sys.executable)


def use_this_python_as_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the ``python3`` kernelspec start this interpreter (the venv with alp_jax).

    If the installed ``python3`` kernel would start another Python, a temporary kernelspec
    of that name goes first on ``JUPYTER_PATH``, which jupyter_client searches first.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = KernelSpecManager().get_kernel_spec("python3").argv
    except NoSuchKernel:
        argv = []
    if argv and _starts_this_python(argv[0]):
        return
    kernel_dir = tmp_path / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (kernel_dir / "kernel.json").write_text(json.dumps(spec))
    paths = [str(tmp_path / "jupyter")] + [p for p in os.environ.get(
        "JUPYTER_PATH", "").split(os.pathsep) if p]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(paths))
    resolved = KernelSpecManager().get_kernel_spec("python3").argv[0]
    assert os.path.samefile(resolved, sys.executable), resolved


def test_notebook_is_saved_without_outputs() -> None:
    """The committed notebook is valid nbformat 4 with no stored outputs (clean diffs)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_is_colab_ready() -> None:
    """The first code cell installs the package (showing the command, keeping a preinstalled
    JAX); no cell reads test settings from the environment or uses paths of the checkout."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "pip" in code[0] and "install" in code[0] and "shlex.join(command)" in code[0]
    assert '"jax", "jaxlib"' in code[0]  # pins the installed JAX
    assert "<repository URL>" not in "".join(c.source for c in nb.cells)
    parameters_cell(nb)
    for src in code[1:]:
        assert "os.environ" not in src and "QUICKSTART" not in src, src[:80]
        assert "configs/" not in src and "examples/" not in src, src[:80]


def test_install_cell_finds_the_checkout_and_keeps_the_installed_jax(tmp_path: Path) -> None:
    """The install cell's helpers, run on their own (the tests' kernel has alp_jax, so the
    notebook run never reaches the install): the clone is found from any directory inside
    it and not elsewhere, and the command pins the installed jax and jaxlib."""
    import importlib.metadata

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(c.source for c in nb.cells if c.cell_type == "code")
    helpers = first[:first.index("\ntry:\n")]  # the definitions, not the install itself
    scope: dict = {}
    exec(compile(helpers, "install cell", "exec"), scope)  # noqa: S102 - our own notebook
    assert scope["find_checkout"](str(REPO / "examples")) == str(REPO)
    assert scope["find_checkout"](str(tmp_path)) is None
    command = scope["install_command"]("SRC")
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and "SRC" in command
    for name in ("jax", "jaxlib"):
        assert f"{name}=={importlib.metadata.version(name)}" in command


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executes every cell; the ALP model must learn, resist PGD less than clean, and plot."""
    use_this_python_as_kernel(tmp_path, monkeypatch)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells[parameters_cell(nb)].source = (
        f"TRAIN_STEPS = {STEPS}\nEVAL_EXAMPLES = {EVAL_EXAMPLES}\n"
        f"SUITE_EXAMPLES = {SUITE_EXAMPLES}\nTRAIN_BASELINE = True\n")
    workdir = tmp_path / "somewhere_else"  # not the checkout: no path may depend on it
    workdir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=program_env(None))  # raises CellExecutionError on the first failing cell

    text, pngs = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                pngs += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
    stdout = "\n".join(text)
    assert f"TRAIN_STEPS = {STEPS}" in stdout, "the notebook ignored its parameters cell"
    match = RESULT.search(stdout)
    assert match, f"no RESULT line in the notebook output:\n{stdout[-2000:]}"
    clean, pgd, worst = (float(match.group(i)) for i in (1, 2, 3))
    assert f"ALP model on {EVAL_EXAMPLES} validation images" in stdout
    # 10 classes: chance is 0.1; 60 ALP steps reach well above it on the validation split.
    assert 0.0 <= pgd <= clean <= 1.0, (clean, pgd)
    assert 0.0 <= worst <= clean, (worst, clean)
    assert clean > 0.5, clean
    assert "baseline_clean=" in match.string[match.start():].splitlines()[0]
    assert "restored identical: True" in stdout
    assert "| **worst case** |" in stdout and "Masking checks" in stdout
    assert "robust to all 4 restarts" in stdout
    assert pngs >= 3, f"expected the three figures as PNG outputs, got {pngs}"
