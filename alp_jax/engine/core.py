"""Per-example correctness under attack specs, sharded over the mesh's data axis.

Every batch is padded to one global shape (padding rows masked out), split over the
``data`` axis by ``alp_jax.sharding`` as in training, and each process feeds its local
share; results come back replicated, so every process holds the whole answer and
process 0 writes it. Example ``i`` of the split under spec ``s`` is attacked alone with
the key ``fold_in(fold_in(PRNGKey(seed), seed_index(s)), i)`` (``grammar.seed_index``
drops ``_rK``), so its result depends on neither the batch size, nor the device count,
nor the process count. Each attack family is compiled once for all eps (EPS and STEP
are arguments); compile time is measured apart from attack time.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from alp_jax import losses, sharding
from alp_jax.attacks import common, grammar
from alp_jax.attacks.grammar import AttackSpec, Bounds

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ModelLogits:
    """``(variables, x) -> inference-mode logits`` (``common.inference_logits_fn``), equal
    for equal models, so that several checkpoints of one model share compiled attacks."""

    model: Any

    def __call__(self, variables: Any, x: jax.Array) -> jax.Array:
        return common.inference_logits_fn(self.model, variables)(x)


# ---- batches -----------------------------------------------------------------------------

def pad_batch(images: np.ndarray, labels: np.ndarray, index: np.ndarray,
              size: int) -> Batch:
    """A local batch padded to ``size`` rows; ``mask`` is False on the padding."""
    n = len(labels)
    if n > size:
        raise ValueError(f"pad_batch: {n} rows do not fit a batch of {size}.")
    pad = size - n
    shape = (size,) + tuple(images.shape[1:])
    out_images = np.zeros(shape, np.float32)
    out_images[:n] = images
    return {"images": out_images,
            "labels": np.concatenate([np.asarray(labels, np.int32), np.zeros(pad, np.int32)]),
            "index": np.concatenate([np.asarray(index, np.int32), np.full(pad, -1, np.int32)]),
            "mask": np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])}


def padded_local_size(global_batch: int, devices: int, process_count: int) -> int:
    """Rows per process once the global batch is padded to a multiple of the devices."""
    _local_size(global_batch, process_count)
    return _local_size(-(-global_batch // devices) * devices, process_count)


def array_batches(images: np.ndarray, labels: np.ndarray, global_batch: int, *,
                  process_index: int = 0, process_count: int = 1, devices: int = 1,
                  drop_remainder: bool = False) -> Iterator[Batch]:
    """Local padded batches of in-memory arrays, in the data layer's layout: each global
    batch is ``process_count`` consecutive blocks of ``global_batch // process_count``,
    each padded to ``padded_local_size`` rows."""
    local = _local_size(global_batch, process_count)
    rows = padded_local_size(global_batch, devices, process_count)
    n = len(labels)
    stop = n // global_batch * global_batch if drop_remainder else n
    for start in range(0, stop, global_batch):
        lo = min(start + process_index * local, n)
        hi = min(lo + local, n, start + global_batch)
        yield pad_batch(images[lo:hi], labels[lo:hi], np.arange(lo, hi), rows)


def split_batches(cfg: Any, data_dir: str | None, global_batch: int, *,
                  split: str, num_examples: int = -1, drop_remainder: bool = False,
                  devices: int = 1, process_index: int | None = None,
                  process_count: int | None = None) -> tuple[Iterator[Batch], int]:
    """(local padded batches of a dataset split, number of examples they cover).

    Full global batches come from ``data.eval_iterator`` (each process reads its share);
    without ``drop_remainder`` the last partial batch is read too and padded, so every
    example of the split (or of its first ``num_examples``) is evaluated.
    """
    from alp_jax import data

    p = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    local = _local_size(global_batch, count)
    rows_out = padded_local_size(global_batch, devices, count)
    total = data.num_examples(cfg.dataset, split, data_dir)
    n = total if num_examples < 0 else min(num_examples, total)
    full = n // global_batch
    covered = full * global_batch if drop_remainder else n

    def gen() -> Iterator[Batch]:
        if full:
            it = data.eval_iterator(cfg.dataset, data_dir, cfg.dataset_image_size, local,
                                    split=split, num_examples=full * global_batch,
                                    process_index=p, process_count=count)
            for i, b in enumerate(it):
                start = i * global_batch + p * local
                yield pad_batch(b["images"], b["labels"], np.arange(start, start + local),
                                rows_out)
        if covered > full * global_batch:
            # The data layer drops partial batches: read the tail in batches of a divisor
            # of both sizes (one process's view of the whole split) and keep this
            # process's block of it.
            tail_start = full * global_batch
            step = math.gcd(n, global_batch)
            it = data.eval_iterator(cfg.dataset, data_dir, cfg.dataset_image_size, step,
                                    split=split, num_examples=n)
            rows = list(itertools.islice(it, tail_start // step, None))
            images = np.concatenate([r["images"] for r in rows])
            labels = np.concatenate([r["labels"] for r in rows])
            lo = min(p * local, len(labels))
            hi = min(lo + local, len(labels))
            yield pad_batch(images[lo:hi], labels[lo:hi],
                            np.arange(tail_start + lo, tail_start + hi), rows_out)

    return gen(), covered


def _local_size(global_batch: int, process_count: int) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"Batch size {global_batch} must be positive and divide by the "
                         f"{process_count} processes.")
    return global_batch // process_count


def with_index(batches: Iterable[Batch], devices: int = 1) -> Iterator[Batch]:
    """Batches without ``index``/``mask`` (one process) numbered consecutively and padded
    to a multiple of ``devices``."""
    start = 0
    for b in batches:
        if "index" in b:
            yield b
            continue
        n = len(b["labels"])
        yield pad_batch(np.asarray(b["images"]), np.asarray(b["labels"]),
                        np.arange(start, start + n), -(-n // devices) * devices)
        start += n


# ---- compiled functions ------------------------------------------------------------------

def _clean_fn(logits_fn: Callable, num_images: int) -> Callable:
    def run(variables, images, labels, mask, index):
        f = lambda x: logits_fn(variables, x)
        grad = jax.grad(lambda x: jnp.sum(losses.softmax_cross_entropy(f(x), labels)))(images)
        zero = (grad == 0).reshape(grad.shape[0], -1)
        logits = f(images)
        k = min(5, logits.shape[-1])
        return {"top1": losses.topk_correct(logits, labels, 1) & mask,
                "top5": losses.topk_correct(logits, labels, k) & mask,
                "zero_entries": jnp.where(mask, jnp.sum(zero, -1), 0),
                "all_zero": jnp.all(zero, -1) & mask,
                "images": images[:num_images], "mask": mask, "labels": labels,
                "index": index, "pred": jnp.argmax(logits[:num_images], -1)}

    return run


def _attack_fn(logits_fn: Callable, template: AttackSpec, bounds: Bounds,
               num_images: int) -> Callable:
    def run(variables, images, labels, mask, index, spec_key, eps, step):
        spec = dataclasses.replace(template, eps=eps, step=step)
        f = lambda x: logits_fn(variables, x)
        keys = jax.vmap(lambda i: jax.random.fold_in(spec_key, i))(index)
        adv = grammar.generate_per_example(f, images, keys, spec, bounds, labels)
        logits = f(adv)
        k = min(5, logits.shape[-1])
        return {"top1": losses.topk_correct(logits, labels, 1) & mask,
                "top5": losses.topk_correct(logits, labels, k) & mask,
                "images": adv[:num_images], "pred": jnp.argmax(logits[:num_images], -1)}

    return run


class Compiled:
    """Ahead-of-time compiled functions by (name, input signature); compile time kept."""

    def __init__(self) -> None:
        self.cache: dict[Any, Any] = {}

    def get(self, key: Any, build: Callable[[], Any], args: tuple, in_sh: tuple,
            out_sh: Any) -> tuple[Any, float]:
        leaves, tree = jax.tree_util.tree_flatten(args)
        sig = (key, tree, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None))
                                for x in leaves))
        if sig in self.cache:
            return self.cache[sig], 0.0
        t = time.perf_counter()
        compiled = jax.jit(build(), in_shardings=in_sh, out_shardings=out_sh).lower(
            *args).compile()
        self.cache[sig] = compiled
        return compiled, time.perf_counter() - t


# ---- evaluation --------------------------------------------------------------------------

@dataclasses.dataclass
class PerExample:
    """Per-example results of a set of specs on the examples of a split (sorted by index).

    ``correct[spec]`` / ``top5[spec]`` are bool [N] per concrete canonical spec (``clean``
    included); ``compile_seconds`` is per compiled function (``clean`` and each family
    template), ``attack_seconds`` per spec, excluding compilation.
    """

    index: np.ndarray
    labels: np.ndarray
    correct: dict[str, np.ndarray]
    top5: dict[str, np.ndarray]
    zero_grad_fraction: float
    zero_grad_examples: float
    compile_seconds: dict[str, float]
    attack_seconds: dict[str, float]
    clean_images: np.ndarray
    adv_images: dict[str, np.ndarray]
    wall_seconds: float = 0.0
    # Top-1 predictions of the images above (the adversarial-example grid shows them).
    clean_predictions: np.ndarray | None = None
    adv_predictions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def num_examples(self) -> int:
        return int(self.index.shape[0])


@dataclasses.dataclass
class Progress:
    """What a progress callback sees after each batch: running correct counts per spec and
    the per-example top-1 results of this batch (padding removed)."""

    done: int
    total: int | None
    correct: dict[str, int]
    elapsed: float
    batch: dict[str, np.ndarray]


def evaluate_specs(logits_fn: Callable, variables: Any, batches: Iterable[Batch],
                   specs: Sequence[str | AttackSpec], *, num_classes: int, seed: int = 0,
                   bounds: Bounds = (-1.0, 1.0), mesh: Any = None, num_images: int = 0,
                   total: int | None = None,
                   progress: Callable[[Progress], None] | None = None,
                   cache: Compiled | None = None) -> PerExample:
    """Per-example top-1 / top-5 correctness under each spec (``clean`` always included).

    ``logits_fn(variables, x)`` gives inference-mode logits (``ModelLogits``);
    ``batches`` are local padded batches (``split_batches``, ``array_batches``) or plain
    ``{'images', 'labels'}`` batches of one process. Every host batch's labels are
    checked against ``num_classes`` before anything runs on it. ``cache`` keeps compiled
    programs across calls (a caller's own ``Compiled()``, e.g. for an unhashable
    ``logits_fn`` evaluated several times).
    """
    mesh = mesh or sharding.make_mesh()
    canon = list(dict.fromkeys(["clean", *(grammar.canonical(s) for s in specs)]))
    parsed = {s: grammar.parse_attack(s) for s in canon}
    var_sh = sharding.state_sharding(variables, mesh)
    variables = sharding.put_replicated(jax.device_get(variables), var_sh)
    data_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    base = jax.random.PRNGKey(seed)
    spec_keys = {s: np.asarray(jax.random.fold_in(base, grammar.seed_index(s)))
                 for s in canon if s != "clean"}
    hashable = is_hashable(logits_fn)
    # Compiled programs are shared across calls only for a hashable logits_fn (one that
    # names its model, e.g. ModelLogits); otherwise they live for this call.
    if cache is None:
        cache = _COMPILED if hashable else Compiled()
    compile_s: dict[str, float] = {}
    attack_s = dict.fromkeys(canon, 0.0)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("index", "labels")}
    top1: dict[str, list[np.ndarray]] = {s: [] for s in canon}
    top5: dict[str, list[np.ndarray]] = {s: [] for s in canon}
    zero_entries = zero_examples = entries = 0
    clean_images: np.ndarray | None = None
    adv_images: dict[str, np.ndarray] = {}
    clean_pred: np.ndarray | None = None
    adv_pred: dict[str, np.ndarray] = {}
    running = dict.fromkeys(canon, 0)
    t0 = time.time()
    done = 0
    for bi, b in enumerate(with_index(batches, mesh.shape[sharding.DATA])):
        losses.check_labels(b["labels"][b["mask"]], num_classes, what="evaluation labels")
        g = sharding.global_batch({k: b[k] for k in ("images", "labels", "mask", "index")},
                                  mesh)
        k_img = min(num_images, g["images"].shape[0])
        fn_key = (logits_fn, "clean", k_img)
        args = (variables, g["images"], g["labels"], g["mask"], g["index"])
        fn, c = cache.get(fn_key, lambda k_img=k_img: _clean_fn(logits_fn, k_img), args,
                          (var_sh, data_sh, data_sh, data_sh, data_sh), rep)
        if c:
            compile_s["clean"] = compile_s.get("clean", 0.0) + c
        t = time.perf_counter()
        res = jax.device_get(fn(*args))
        attack_s["clean"] += time.perf_counter() - t
        mask_all, index_all, labels_all = (np.asarray(res[k]) for k in ("mask", "index",
                                                                         "labels"))
        keep = mask_all
        out["index"].append(index_all[keep])
        out["labels"].append(labels_all[keep])
        top1["clean"].append(np.asarray(res["top1"])[keep])
        top5["clean"].append(np.asarray(res["top5"])[keep])
        zero_entries += int(np.sum(res["zero_entries"]))
        zero_examples += int(np.sum(res["all_zero"]))
        entries += int(np.sum(keep)) * int(np.prod(g["images"].shape[1:]))
        if bi == 0 and k_img:
            clean_images = np.asarray(res["images"])
            clean_pred = np.asarray(res["pred"])
        for s in canon:
            spec = parsed[s]
            if spec.is_clean:
                continue
            tmpl = grammar.template(spec)
            fn_key = (logits_fn, tmpl, tuple(bounds), k_img)
            args = (variables, g["images"], g["labels"], g["mask"], g["index"],
                    jnp.asarray(spec_keys[s]), jnp.float32(spec.eps), jnp.float32(spec.step))
            fn, c = cache.get(fn_key, lambda tmpl=tmpl, k_img=k_img: _attack_fn(
                logits_fn, tmpl, tuple(bounds), k_img), args,
                (var_sh, data_sh, data_sh, data_sh, data_sh, rep, rep, rep), rep)
            if c:
                compile_s[tmpl.spec] = compile_s.get(tmpl.spec, 0.0) + c
            t = time.perf_counter()
            res = jax.device_get(fn(*args))
            attack_s[s] += time.perf_counter() - t
            top1[s].append(np.asarray(res["top1"])[keep])
            top5[s].append(np.asarray(res["top5"])[keep])
            if bi == 0 and k_img:
                adv_images[s] = np.asarray(res["images"])
                adv_pred[s] = np.asarray(res["pred"])
        done += int(np.sum(keep))
        for s in canon:
            running[s] += int(np.sum(top1[s][-1]))
        if progress is not None:
            progress(Progress(done, total, dict(running), time.time() - t0,
                              {s: top1[s][-1] for s in canon}))
    if not out["index"]:
        raise ValueError("No examples to evaluate: the data gave no batch.")
    index = np.concatenate(out["index"])
    order = np.argsort(index, kind="stable")
    return PerExample(
        index=index[order], labels=np.concatenate(out["labels"])[order],
        correct={s: np.concatenate(v)[order] for s, v in top1.items()},
        top5={s: np.concatenate(v)[order] for s, v in top5.items()},
        zero_grad_fraction=zero_entries / max(entries, 1),
        zero_grad_examples=zero_examples / max(done, 1), compile_seconds=compile_s,
        attack_seconds=attack_s,
        clean_images=clean_images if clean_images is not None else np.zeros((0,)),
        adv_images=adv_images, wall_seconds=time.time() - t0,
        clean_predictions=clean_pred, adv_predictions=adv_pred)


_COMPILED = Compiled()


def is_hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True
