"""Runs ``examples/quickstart.ipynb`` top to bottom (shortened) and checks what it reports.

The notebook reads ``QUICKSTART_STEPS`` so that this test trains 60 steps instead of the
default 200; everything else (the attack, the plots, the baseline) runs as a user sees it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
STEPS = 60
RESULT = re.compile(r"^RESULT clean=([0-9.]+) pgd=([0-9.]+)", re.MULTILINE)


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


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Executes every cell; the ALP model must learn, resist PGD less than clean, and plot."""
    use_this_python_as_kernel(tmp_path, monkeypatch)
    # The kernel inherits this environment: a short run, baseline included.
    monkeypatch.setenv("QUICKSTART_STEPS", str(STEPS))
    monkeypatch.setenv("QUICKSTART_BASELINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    text, pngs = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                pngs += "image/png" in out.data
                text.append(out.data.get("text/plain", ""))
    stdout = "\n".join(text)
    assert f"TRAIN_STEPS = {STEPS}" in stdout, "the notebook ignored QUICKSTART_STEPS"
    match = RESULT.search(stdout)
    assert match, f"no RESULT line in the notebook output:\n{stdout[-2000:]}"
    clean, pgd = float(match.group(1)), float(match.group(2))
    # 10 classes: chance is 0.1; 60 ALP steps reach well above it on the validation split.
    assert 0.0 <= pgd <= clean <= 1.0, (clean, pgd)
    assert clean > 0.5, clean
    assert "baseline_clean=" in match.string[match.start():].splitlines()[0]
    assert pngs >= 2, f"expected the two figures as PNG outputs, got {pngs}"
