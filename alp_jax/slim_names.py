"""The one place that maps our variables onto TF-slim variable names and scopes.

Our parameter tree already carries TF-slim's names (see ``alp_jax.model``), so a slim
name is the tree path joined with ``/``; ``params`` and ``batch_stats`` are merged into
one namespace, as TF has only one. Scopes (``resnet_v2_50/logits``) are matched per
path component: ``a/b`` selects ``a/b`` and ``a/b/...`` but not ``a/bc``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

COLLECTIONS = ("params", "batch_stats")


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def variables_to_slim(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{'params': ..., 'batch_stats': ...}`` -> ``{slim_name: ndarray}``."""
    named: dict[str, np.ndarray] = {}
    for col in COLLECTIONS:
        for name, value in _flat(variables.get(col, {})).items():
            if name in named:
                raise ValueError(f"Variable {name!r} appears in more than one collection.")
            named[name] = np.asarray(value)
    return named


def slim_names(variables: Mapping[str, Any]) -> list[str]:
    """Sorted TF-slim names of all variables (parameters and batch statistics)."""
    return sorted(n for col in COLLECTIONS for n in _flat(variables.get(col, {})))


def variables_from_slim(named: Mapping[str, Any], like: Mapping[str, Any],
                        *, strict: bool = True) -> dict[str, Any]:
    """Fills a variables tree shaped like ``like`` from ``{slim_name: array}``.

    With ``strict`` every name must be present on both sides; names in ``named`` that
    ``like`` lacks are an error listing them, as are missing names and shape mismatches.
    With ``strict=False`` variables missing from ``named`` keep the value in ``like``.
    """
    out: dict[str, Any] = {}
    missing, mismatched = [], []
    known = set()
    for col in COLLECTIONS:
        if col not in like:
            continue
        flat = traverse_util.flatten_dict(dict(like[col]))
        new = {}
        for path, ref in flat.items():
            name = "/".join(path)
            known.add(name)
            if name not in named:
                if strict:
                    missing.append(name)
                new[path] = ref
                continue
            value = np.asarray(named[name])
            if tuple(value.shape) != tuple(np.shape(ref)):
                mismatched.append(f"{name}: checkpoint {tuple(value.shape)} vs model "
                                  f"{tuple(np.shape(ref))}")
                continue
            new[path] = value.astype(np.asarray(ref).dtype if hasattr(ref, "dtype") else None)
        out[col] = traverse_util.unflatten_dict(new)
    unexpected = sorted(set(named) - known)
    problems = []
    if mismatched:
        problems.append("shapes differ:\n  " + "\n  ".join(mismatched))
    if missing:
        problems.append("missing from the source:\n  " + "\n  ".join(sorted(missing)))
    if unexpected and strict:
        problems.append("not in the model:\n  " + "\n  ".join(unexpected))
    if problems:
        raise ValueError("Cannot map variables onto the model; " + "\n".join(problems))
    return out


def in_scopes(name: str, scopes: Iterable[str]) -> bool:
    """Whether a slim name lies under any of the scopes (component-wise prefix)."""
    for scope in scopes:
        scope = scope.strip().rstrip("/")
        if scope and (name == scope or name.startswith(scope + "/")):
            return True
    return False


def parse_scopes(scopes: str | Iterable[str] | None) -> list[str]:
    """``'a/b,c'`` or ``['a/b', 'c']`` -> ``['a/b', 'c']`` (empty entries dropped)."""
    if scopes is None:
        return []
    if isinstance(scopes, str):
        scopes = scopes.split(",")
    return [s.strip().rstrip("/") for s in scopes if s.strip()]


def check_scopes(scopes: Iterable[str], names: Iterable[str], what: str = "scope") -> None:
    """Raises if a scope matches no variable name, listing the top-level scopes."""
    names = list(names)
    for scope in scopes:
        if not any(in_scopes(n, [scope]) for n in names):
            tops = sorted({"/".join(n.split("/")[:2]) for n in names})
            raise ValueError(
                f"{what} {scope!r} matches no variable. Scopes look like "
                f"{', '.join(tops[:8])}{', ...' if len(tops) > 8 else ''}.")


def scope_mask(tree: Mapping[str, Any], scopes: Iterable[str]) -> Any:
    """A bool pytree like ``tree`` (a params or batch_stats tree): True under the scopes."""
    scopes = list(scopes)
    flat = traverse_util.flatten_dict(dict(tree))
    return traverse_util.unflatten_dict(
        {k: in_scopes("/".join(k), scopes) for k in flat})


def tree_paths(tree: Mapping[str, Any]) -> list[str]:
    """Slim names of the leaves of one collection tree."""
    return ["/".join(k) for k in traverse_util.flatten_dict(dict(tree))]


def map_with_names(fn, tree: Mapping[str, Any]) -> Any:
    """``tree_map`` where ``fn(name, leaf)`` also receives the leaf's slim name."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn("/".join(getattr(k, "key", str(k)) for k in p), x), tree)
