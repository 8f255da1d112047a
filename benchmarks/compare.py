"""Runs ours and the peers at the same settings, one after the other, and prints ratios.

Each program runs in its own process (so that XLA flags, thread pools and allocators do
not mix) with the shared flags; their JSON lines are collected and put side by side::

    python benchmarks/compare.py --batch 32 --attack pgdll_16_2_10 --steps 5 --ours= \
        --ours="--model_conv_impl=xla"

``--ours=FLAGS`` (with ``=``, since FLAGS start with ``--``) may be given several times:
each is one variant of ``train_step.py``'s extra flags (empty: the step as the programs
run it, ``conv_impl=auto``).
The ratio column is each row's images/s over the fastest peer's for the same part and
batch. They run one after the other: on a shared machine, compare only rows taken at a
similar load (the table prints it).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = {
    "torch": HERE / "peers" / "torch_alp.py",
    "tf_slim": HERE / "peers" / "tf_slim_alp.py",
}
SHARED = ("model", "num_classes", "image_size", "batch", "attack", "lp_weight", "parts",
          "steps", "warmup")


def _provenance() -> dict[str, Any]:
    """This checkout's revision and the host, for a peer's records (no JAX device)."""
    sys.path.insert(0, str(HERE.parent))
    from alp_jax import provenance

    return {"alp_jax_revision": provenance.code_revision(), "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor()}


def run(cmd: Sequence[str], json_path: str) -> list[dict[str, Any]]:
    """Runs one benchmark program; returns its JSON records (stderr passes through)."""
    print("$ " + " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for r in records:  # the peers (PyTorch, TF-slim) record their own framework's version
        r.setdefault("provenance", _provenance())
    if proc.returncode != 0:
        print(f"(exit {proc.returncode}: {len(records)} records kept)", file=sys.stderr)
    if json_path:
        with open(json_path, "a") as f:
            for r in records:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    return records


def name_of(rec: dict[str, Any]) -> str:
    if "impl" in rec:
        return rec["impl"]
    bits = ["alp-jax"]
    # Named by what differs from the programs' default (auto); records older than the
    # model_conv_impl key ran lax convolutions.
    if rec.get("model_conv_impl", "xla") != "auto":
        bits.append(f"{rec.get('model_conv_impl', 'xla')}-convs")
    if rec.get("xla_flags"):
        bits.append("flags")
    if rec.get("label"):
        bits.append(rec["label"])
    return "-".join(bits)


def ratio_table(records: Sequence[dict[str, Any]]) -> str:
    """Rows of images/s with the ratio to the fastest peer of the same part and batch."""
    best: dict[tuple[str, int], float] = {}
    for r in records:
        if "impl" in r:
            key = (r["part"], r["batch"])
            best[key] = max(best.get(key, 0.0), r["images_per_s"])
    head = ("impl", "part", "batch", "attack", "img/s", "x best peer", "load (1 min)")
    rows = [head]
    for r in sorted(records, key=lambda r: (r["batch"], r["part"], name_of(r))):
        peer = best.get((r["part"], r["batch"]))
        load = r.get("load_average") or ["?"]
        rows.append((name_of(r), r["part"], str(r["batch"]), r["attack"],
                     f"{r['images_per_s']:.2f}",
                     f"{r['images_per_s'] / peer:.2f}" if peer else "-", str(load[0])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet_v2_50")
    p.add_argument("--num_classes", default="200")
    p.add_argument("--image_size", default="64")
    p.add_argument("--batch", default="32")
    p.add_argument("--attack", default="pgdll_16_2_10")
    p.add_argument("--lp_weight", default="0.5")
    p.add_argument("--parts", default="clean,attack,alp")
    p.add_argument("--steps", default="5")
    p.add_argument("--warmup", default="1")
    p.add_argument("--ours", action="append", default=None,
                   help="extra flags of one train_step.py variant (repeatable)")
    p.add_argument("--peers", default="torch,tf_slim", help=f"subset of {','.join(PEERS)}")
    p.add_argument("--torch_args", default="", help="extra flags of the PyTorch peer")
    p.add_argument("--tf_args", default="", help="extra flags of the TF-slim peer")
    p.add_argument("--json", default="", help="append every record to this file")
    args = p.parse_args(argv)
    shared = [f"--{k}={getattr(args, k)}" for k in SHARED]
    records: list[dict[str, Any]] = []
    for variant in args.ours if args.ours is not None else [""]:
        cmd = [sys.executable, str(HERE / "train_step.py"), *shared, *shlex.split(variant)]
        records += run(cmd, args.json)
    extra = {"torch": args.torch_args, "tf_slim": args.tf_args}
    for peer in [x for x in args.peers.split(",") if x]:
        if peer not in PEERS:
            p.error(f"--peers: unknown peer {peer!r}; valid: {', '.join(PEERS)}")
        cmd = [sys.executable, str(PEERS[peer]), *shared, *shlex.split(extra[peer])]
        records += run(cmd, args.json)
    print(ratio_table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
