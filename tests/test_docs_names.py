"""The README and docs/ name only what exists: every ``alp_jax.X.Y`` imports, every file
path exists (and every ``path::test`` names a test there), and every ``--flag`` is one
its program's parser takes.

A flag belongs to the program named before it in the same command (``python -m
alp_jax.X``, ``alp-X``, ``python tools/x.py``, ``python benchmarks/x.py``), in a code
block or an inline code span; a command of the three main programs is parsed whole by a
fresh absl parser, as the program would parse it. A flag named alone in the text must be
one of some program's. Flags before any program in a command are another tool's
(``pip``, ``gcloud``, ``#SBATCH``), and ``--xla_*`` are XLA's own (``XLA_FLAGS``).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import importlib.util
import io
import os
import re
import shlex
import sys

import pytest
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, REPO)
                             for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
MAIN = {"alp_jax.train": "alp_jax.train", "alp_jax.eval": "alp_jax.eval",
        "alp_jax.robustness": "alp_jax.robustness", "alp-train": "alp_jax.train",
        "alp-eval": "alp_jax.eval", "alp-robustness": "alp_jax.robustness"}
SCRIPTS = {"alp_jax.demo": "alp_jax/demo.py",
           **{f"{d}/{os.path.basename(p)}": f"{d}/{os.path.basename(p)}"
              for d in ("tools", "benchmarks")
              for p in glob.glob(os.path.join(REPO, d, "*.py"))}}
PROGRAM = re.compile(r"(?:python -m (alp_jax\.\w+)|\b(alp-(?:train|eval|robustness))\b|"
                     r"python (?:-m )?((?:tools|benchmarks)/\w+\.py))")
# Not a flag inside another flag's value (``--ours="--model_conv_impl=xla"``).
FLAG = re.compile(r"(?<![\w=\"'-])--([a-z][a-z0-9_]*(?:\.[A-Za-z_]\w*)?)(?![\w-])")
ABSL_BUILTIN = {"help", "helpfull", "helpshort", "helpxml", "flagfile"}


def _text(name: str) -> str:
    with open(os.path.join(REPO, name)) as f:
        return f.read()


def _commands(text: str) -> list[tuple[str, bool]]:
    """(command, in a code block): code blocks' lines (continuations joined) and inline
    code spans."""
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        out += [(line, True) for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    out += [(" ".join(span.split()), False) for span in re.findall(r"`([^`]+)`", prose)]
    return out


def _uses() -> list[tuple[str, str | None, str]]:
    """(doc, program or None, the rest of the command from the flag on) per flag named."""
    uses = []
    for doc in DOCS:
        for line, in_block in _commands(_text(doc)):
            m = PROGRAM.search(line)
            if m is None and in_block:
                continue  # a line of another tool (pip, gcloud, #SBATCH)
            program = next(g for g in m.groups() if g) if m else None
            # Flags before the program are another tool's (XLA_FLAGS=..., gcloud); a span
            # without a program names a flag alone, checked against every program.
            for f in FLAG.finditer(line, m.end() if m else 0):
                uses.append((doc, program, f.group(1)))
    return uses


@functools.cache
def _script_flags(path: str) -> frozenset[str]:
    """The flags a script defines: absl's DEFINE_* calls, or its argparse help text."""
    source = _text(path)
    names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    if "argparse" in source:
        spec = importlib.util.spec_from_file_location(
            "docs_" + os.path.basename(path)[:-3], os.path.join(REPO, path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
            parse = getattr(module, "parse_args", None) or module.main
            out = io.StringIO()
            with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
                parse(["--help"])
        finally:
            del sys.modules[spec.name]
        names |= set(re.findall(r"--(?:\[no-\])?([a-z][a-z0-9_]*)", out.getvalue()))
    return frozenset(names)


def _parser(module: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    importlib.import_module(module).define_flags(fv)
    return fv


def _defined(program: str | None, name: str) -> bool:
    if name.split(".")[0] in ABSL_BUILTIN:
        return True
    if name.startswith("config."):
        from alp_jax.config import default_config

        field = name.split(".", 1)[1]
        return field in ("FIELD", "field") or field in default_config()
    if program in MAIN:
        return name.removeprefix("no") in _parser(MAIN[program]) or name in _parser(
            MAIN[program])
    if program is not None:
        return name in _script_flags(SCRIPTS[program])
    return any(_defined(p, name) for p in (*set(MAIN.values()), *SCRIPTS))


def test_every_flag_the_docs_name_is_a_flag_of_its_program():
    stale = sorted({f"{doc}: --{name}" + (f" ({program})" if program else "")
                    for doc, program, name in _uses()
                    if not name.startswith("xla_") and not _defined(program, name)})
    assert not stale, "flags the docs name that no program takes:\n" + "\n".join(stale)


def test_every_main_program_command_parses(monkeypatch):
    """Each command of alp-train / alp-eval / alp-robustness, parsed whole as written by
    the programs' own parser (``cli.parse_flags``: absl, the configs, ranges)."""
    from alp_jax import cli

    bad = []
    for doc in DOCS:
        for line, _ in _commands(_text(doc)):
            m = PROGRAM.search(line)
            program = next((g for g in m.groups() if g), None) if m else None
            if program not in MAIN:
                continue
            tokens = _split(line[m.end():].split("&&")[0])
            argv = [t for t in tokens if t.startswith("--") and "..." not in t
                    and t[2:].split("=")[0] not in ABSL_BUILTIN]
            # ml_collections reads --config.x overrides from sys.argv.
            monkeypatch.setattr(sys, "argv", ["prog", *argv])
            try:
                cli.parse_flags(["prog", *argv], _parser(MAIN[program]))
            except flags.Error as e:
                bad.append(f"{doc}: {program} {' '.join(argv)}: {e}")
    assert not bad, "\n".join(bad)


def _split(command: str) -> list[str]:
    """Shell words; a command quoted inside another's (``gcloud ... --command="..."``)
    ends in that quote."""
    try:
        return shlex.split(command)
    except ValueError:
        return shlex.split(command.rstrip().removesuffix('"'))


def _resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _names(text: str) -> set[str]:
    names = set(re.findall(r"\balp_jax(?:\.[A-Za-z_]\w*)+", text))
    for module, imported in re.findall(r"from (alp_jax[\w.]*) import ([\w, ]+)", text):
        names |= {f"{module}.{n.split(' as ')[0].strip()}" for n in imported.split(",")
                  if n.strip()}
    return names


def test_every_alp_jax_name_the_docs_give_exists():
    stale = sorted(f"{doc}: {n}" for doc in DOCS for n in _names(_text(doc)) if not _resolve(n))
    assert not stale, "names the docs give that do not exist:\n" + "\n".join(stale)


def test_every_file_and_test_the_docs_name_exists():
    stale = []
    for doc in DOCS:
        for path, test in re.findall(
                r"\b((?:alp_jax|tools|benchmarks|tests|examples|docs)/[\w/.-]*\w\.(?:py|md|ipynb|txt))"
                r"(?:::(\w+))?", _text(doc)):
            full = os.path.join(REPO, path)
            if not os.path.exists(full):
                stale.append(f"{doc}: {path}")
            elif test and not re.search(rf"def {test}\(", _text(path)):
                stale.append(f"{doc}: {path}::{test}")
    assert not stale, "files or tests the docs name that do not exist:\n" + "\n".join(stale)


def test_the_checks_catch_a_stale_name():
    """What the tests above would say about names that no longer exist."""
    assert not _resolve("alp_jax.pgd.register_attack")
    assert _resolve("alp_jax.attacks.register_family")
    assert not _defined("alp_jax.robustness", "fast_attack")
    assert not _defined(None, "no_such_flag") and _defined(None, "attack_modules")
    assert not _defined("benchmarks/train_step.py", "fast_attack")
    assert _defined("benchmarks/train_step.py", "model_conv_impl")


def test_no_markers_of_the_projects_own_issues():
    """The docs say what is true of the code; its history lives in CHANGELOG.md."""
    found = [f"{doc}: {m}" for doc in DOCS
             for m in re.findall(r"<!--.*?-->|\bissues? \d+", _text(doc), re.S | re.I)]
    assert not found, "\n".join(found)
