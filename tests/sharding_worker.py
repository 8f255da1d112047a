"""Run by tests/test_sharding.py in a subprocess with several forced CPU devices.

Without arguments: trains a few ALP steps of the small model on the same batches with
meshes of different sizes and prints a JSON report (parameter differences, shardings,
compile counts). ``robustness CHECKPOINT`` instead evaluates the default robustness suite
on 1 device at batch 16 and on 8 devices at batch 25 and reports where the per-example
results differ.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np


def main() -> None:
    from alp_jax import data, sharding, steps
    from alp_jax import train_state as ts
    from alp_jax.config import default_config
    from alp_jax.model import create_model

    cfg = default_config()
    cfg.model_name = "resnet_v2_small"
    cfg.dataset_image_size = 8
    cfg.batch_size = 16
    cfg.examples_per_epoch = 1438
    cfg.num_classes = 10
    cfg.train_adv_method = "pgdll_16_4_2"
    cfg.train_lp_weight = 0.5
    cfg.learning_rate = 0.02
    model = create_model(cfg.model_name, 10, conv_impl="im2col")  # the CPU default
    tx, _ = ts.optimizer_from_config(cfg, cfg.examples_per_epoch)
    it = data.train_iterator("digits", None, 8, 16)
    batches = [next(it) for _ in range(3)]

    # One initial state, laid out on each mesh below (initialising on each mesh compiled
    # the random initialisers three times; the sharded init is launched by the programs,
    # e.g. test_sharding.py's two-process run).
    initial = jax.device_get(jax.jit(
        lambda rng: ts.create_train_state(model, tx, rng, 8, moving_average_decay=0.99))(
            jax.random.PRNGKey(0)))

    def run(devices, model_axis=1):
        mesh = sharding.make_mesh(model_axis, devices)
        sharding.check_global_batch(16, mesh)
        sh = sharding.state_sharding(initial, mesh)
        state = jax.device_put(initial, sh)
        step = sharding.jit_train_step(steps.train_step_from_config(cfg, model), sh, mesh)
        specs = []
        for b in batches:
            g = sharding.global_batch(b, mesh)
            specs.append([str(g["images"].sharding.spec), len(g["images"].sharding.device_set)])
            state, metrics = step(state, g["images"], g["labels"])
        params = jax.tree_util.tree_leaves(jax.device_get(state.params))
        sharded_params = sum(
            1 for x in jax.tree_util.tree_leaves(state.params)
            if not x.sharding.is_fully_replicated)
        return params, specs, step._cache_size(), float(metrics["total_loss"]), sharded_params

    devs = jax.devices()
    p1, _, _, loss1, _ = run(devs[:1])
    p8, specs8, compiles8, loss8, _ = run(devs)
    p42, _, _, loss42, n_sharded = run(devs, model_axis=2)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p8, strict=True))
    diff42 = max(float(np.max(np.abs(a - b))) for a, b in zip(p1, p42, strict=True))
    scale = max(float(np.max(np.abs(a))) for a in p1)
    print("REPORT " + json.dumps({
        "devices": len(devs), "max_diff_8": diff, "max_diff_4x2": diff42, "param_scale": scale,
        "loss": [loss1, loss8, loss42], "batch_specs": specs8, "compiles": compiles8,
        "params_sharded_on_model_axis": n_sharded}))
    try:
        sharding.check_global_batch(12, sharding.make_mesh(1, devs))
    except ValueError as e:
        print("BATCH_ERROR " + str(e))


def robustness(checkpoint: str, num_examples: int = 20, eps: int = 16) -> None:
    from alp_jax import checkpoints, engine, sharding
    from alp_jax.data import digits
    from alp_jax.model import create_model

    model = create_model("resnet_v2_small", 10, conv_impl="im2col")
    variables = checkpoints.load_variables(checkpoint, use_ema=False)
    x, y = digits.load_split("validation", 16)
    x, y = x[:num_examples], y[:num_examples]
    devs = jax.devices()
    runs = {}
    # Devices and batch change together (one compile of the suite fewer than changing each
    # alone): a dependence on either shows as a difference.
    for name, n_dev, batch in (("1dev_b16", 1, 16), ("8dev_b25", 8, 25)):
        mesh = sharding.make_mesh(1, devs[:n_dev])
        r = engine.evaluate_suite(
            engine.ModelLogits(model), engine.array_batches(x, y, batch, devices=n_dev),
            engine.DEFAULT_ATTACKS, [eps], variables=variables, num_classes=10, mesh=mesh,
            num_images=0)
        runs[name] = engine.per_example_arrays(r)
    ref = runs["1dev_b16"]
    diffs = {name: {k: int(np.sum(v[k] != ref[k])) for k in ref} for name, v in runs.items()}
    print("REPORT " + json.dumps({
        "devices": len(devs), "columns": sorted(ref), "examples": int(len(ref["index"])),
        "differences": diffs, "accuracy": {k: float(np.mean(v)) for k, v in ref.items()
                                            if v.dtype == bool}}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["robustness"]:
        sys.exit(robustness(sys.argv[2]))
    sys.exit(main())
