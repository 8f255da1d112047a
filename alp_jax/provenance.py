"""Which code, packages and devices produced a number.

Every output that carries a number (a training run's ``config.json`` and the first record
it writes to ``metrics.jsonl``, ``results.json`` of ``alp-robustness`` and of the demo,
the benchmarks' JSON lines) embeds ``record()`` under the key ``"provenance"``, so a
figure can be traced back to a package version, a code revision, the library versions
and the hardware that computed it.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import Any

# The libraries whose versions change results or speed; distribution names.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml-collections")
DISTRIBUTION = "alp-jax"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{distribution: version}`` of the installed ``names`` (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(repo: str, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True,
                           timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _installed_from() -> dict[str, Any] | None:
    """What pip recorded about where the package came from (PEP 610 ``direct_url.json``):
    the commit of a ``pip install git+URL@REV``, or the directory of a local install."""
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text:
        return None  # installed from an index: the version says it all
    info = json.loads(text)
    vcs = info.get("vcs_info") or {}
    return {"commit": vcs.get("commit_id"), "dirty": None, "source": info.get("url")}


@functools.lru_cache(maxsize=1)
def code_revision() -> dict[str, Any] | None:
    """``{"commit", "dirty", "source"}`` of the code that is running, when it is known.

    A git checkout the package is imported from (editable installs, ``PYTHONPATH``) gives
    its HEAD and whether tracked files differ from it; only when the checkout's top level
    is the package's parent directory, so a virtualenv inside some other repository does
    not report that repository's commit. Otherwise pip's record of a VCS install gives the
    commit it installed. None when neither is known (an install from the package index:
    the version identifies it).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    top = _git(root, "rev-parse", "--show-toplevel")
    if top and os.path.realpath(top) == os.path.realpath(root):
        commit = _git(root, "rev-parse", "HEAD")
        if commit:
            status = _git(root, "status", "--porcelain", "--untracked-files=no")
            return {"commit": commit, "dirty": None if status is None else bool(status),
                    "source": root}
    installed = _installed_from()
    if installed and installed.get("commit"):
        return installed
    return None


def device_info() -> dict[str, Any]:
    """Platform, device kind, global and local device count and the process layout."""
    import jax

    devices = jax.devices()
    return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(), "process_index": jax.process_index()}


def record() -> dict[str, Any]:
    """The provenance of a number computed now: package version, code revision (None when
    unknown), library versions, Python, the devices and processes, and the UTC time."""
    from alp_jax import __version__

    return {"alp_jax": __version__, "revision": code_revision(),
            "packages": package_versions(), "python": platform.python_version(),
            **device_info(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds")}


def code_version() -> str:
    """``alp_jax VERSION`` plus the git commit (``.dirty`` when tracked files differ)."""
    from alp_jax import __version__

    commit = (code_revision() or {}).get("commit")
    if not commit:
        return __version__
    dirty = (code_revision() or {}).get("dirty")
    return f"{__version__}+{commit[:12]}{'.dirty' if dirty else ''}"


def describe(rec: dict[str, Any]) -> str:
    """One line for a console: ``alp_jax 0.1.0 (abc1234+dirty), jax 0.10.2, 1 cpu ...``."""
    rev = rec.get("revision") or {}
    commit = (rev.get("commit") or "")[:10]
    where = f" ({commit}{'+dirty' if rev.get('dirty') else ''})" if commit else ""
    pk = rec.get("packages", {})
    return (f"alp_jax {rec['alp_jax']}{where}, jax {pk.get('jax')} / jaxlib "
            f"{pk.get('jaxlib')}, flax {pk.get('flax')}; {rec['device_count']} x "
            f"{rec['device_kind']} ({rec['platform']}), {rec['process_count']} process(es)")
