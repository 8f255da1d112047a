"""The ALP step in PyTorch (eager, optionally ``torch.compile``) for comparison.

Same work as ``alp_jax.steps.make_train_step`` with objective ``alp``:

- ResNet-v2-50 as TF-slim builds it: pre-activation bottlenecks (stride on the last unit
  of a block), ``conv2d_same`` padding, a 7x7/2 root with bias and a SAME 3x3/2 max pool,
  biases on ``conv3``/shortcut/logits, BatchNorm decay 0.997 and epsilon 1.001e-5.
  Same shapes and FLOPs; not the same weights.
- PGD (``pgd``/``pgdll``/``pgdrnd``): clean logits in eval mode choose the target, random
  start in the eps-ball, NITER steps of ``x -/+ step * sign(grad of summed xent)``,
  clipped to the ball and to [-1, 1]; only input gradients are computed.
- One train-mode forward on the interleaved mixed minibatch ``[c0, a0, c1, a1, ...]``,
  smoothed cross-entropy (0.1) + ``lp_weight * mean((clean - adv)^2)`` + weight decay
  ``1e-4 * sum(v^2) / 2`` over all parameters, TF1 RMSProp (ms starts at ones, epsilon
  inside the square root, momentum 0.9) and moving averages of parameters and buffers.

    python benchmarks/peers/torch_alp.py --batch 32 --attack pgdll_16_2_10 --steps 10
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=common.BN_EPSILON, momentum=1.0 - common.BN_DECAY)


class Bottleneck(nn.Module):
    """resnet_v2.bottleneck (pre-activation)."""

    def __init__(self, cin: int, depth: int, bottleneck: int, stride: int):
        super().__init__()
        self.stride = stride
        self.preact = _bn(cin)
        self.shortcut = nn.Conv2d(cin, depth, 1, stride) if cin != depth else None
        self.conv1 = nn.Conv2d(cin, bottleneck, 1, bias=False)
        self.bn1 = _bn(bottleneck)
        # conv2d_same: for an odd kernel, symmetric padding (k-1)/2 at stride 1 and 2.
        self.conv2 = nn.Conv2d(bottleneck, bottleneck, 3, stride, padding=1, bias=False)
        self.bn2 = _bn(bottleneck)
        self.conv3 = nn.Conv2d(bottleneck, depth, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = F.relu(self.preact(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        else:
            shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        r = F.relu(self.bn1(self.conv1(preact)))
        r = F.relu(self.bn2(self.conv2(r)))
        return shortcut + self.conv3(r)


class ResNetV2(nn.Module):
    """TF-slim resnet_v2_50 with logits (NCHW)."""

    def __init__(self, num_classes: int, units: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3)
        layers, cin = [], 64
        for base, n, stride in zip((64, 128, 256, 512), units, (2, 2, 2, 1), strict=True):
            for i in range(n):
                layers.append(Bottleneck(cin, 4 * base, base, stride if i == n - 1 else 1))
                cin = 4 * base
        self.units = nn.Sequential(*layers)
        self.postnorm = _bn(cin)
        self.logits = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        # slim.max_pool2d(3, stride=2, padding='SAME'): TF pads (total-before) after.
        h, w = x.shape[-2:]
        ph = max((math.ceil(h / 2) - 1) * 2 + 3 - h, 0)
        pw = max((math.ceil(w / 2) - 1) * 2 + 3 - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=-math.inf)
        x = F.max_pool2d(x, 3, 2)
        x = self.units(x)
        x = F.relu(self.postnorm(x))
        x = torch.mean(x, dim=(2, 3), keepdim=True)
        return self.logits(x)[:, :, 0, 0]


class ALPBench:
    """The attack, the clean step and the ALP step on one model."""

    def __init__(self, args: argparse.Namespace, memory_format: torch.memory_format):
        self.args = args
        self.fmt = memory_format
        self.model = ResNetV2(args.num_classes, common.units(args)).to(
            memory_format=memory_format)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.params = [p for p in self.model.parameters()]
        self.buffers = [b for n, b in self.model.named_buffers() if "num_batches" not in n]
        self.ms = [torch.ones_like(p) for p in self.params]
        self.mom = [torch.zeros_like(p) for p in self.params]
        self.ema = [t.detach().clone() for t in self.params + self.buffers]
        self.step_count = 0

    def attack(self, images: torch.Tensor, spec: str) -> torch.Tensor:
        method, eps, step, niter = common.parse_attack(spec)
        eps, step = eps * 2.0 / 255.0, step * 2.0 / 255.0
        self.model.eval()
        for p in self.params:
            p.requires_grad_(False)
        try:
            with torch.no_grad():
                if method == "pgdrnd":
                    targets = torch.randint(0, self.args.num_classes, (images.shape[0],))
                else:
                    clean = self.forward(images)
                    targets = clean.argmin(1) if method == "pgdll" else clean.argmax(1)
                lo, hi = images - eps, images + eps
                x = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(-1.0, 1.0)
                x = torch.minimum(torch.maximum(x, lo), hi)
            sign = 1.0 if method == "pgd" else -1.0
            for _ in range(niter):
                x.requires_grad_(True)
                loss = F.cross_entropy(self.forward(x), targets, reduction="sum")
                (g,) = torch.autograd.grad(loss, x)
                with torch.no_grad():
                    x = x + sign * step * torch.sign(g)
                    x = torch.minimum(torch.maximum(x, lo), hi).clamp(-1.0, 1.0)
        finally:
            for p in self.params:
                p.requires_grad_(True)
        return x.detach()

    def run(self, part: str, images: torch.Tensor, labels: torch.Tensor, attack: str) -> Any:
        """One step of ``part``: ``clean``, ``attack`` or ``alp``."""
        if part == "clean":
            return self.train_step(images, labels, None)
        if part == "attack":
            return self.attack(images, attack)
        return self.train_step(images, labels, self.attack(images, attack))

    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   adv: torch.Tensor | None) -> torch.Tensor:
        self.model.train()
        if adv is None:
            inputs, both = images, labels
        else:
            inputs = torch.stack([images, adv], dim=1).flatten(0, 1)
            inputs = inputs.contiguous(memory_format=self.fmt)
            both = labels.repeat_interleave(2)
        logits = self.forward(inputs)
        loss = F.cross_entropy(logits, both, label_smoothing=common.LABEL_SMOOTHING)
        if adv is not None and self.args.lp_weight > 0:
            loss = loss + self.args.lp_weight * torch.mean((logits[0::2] - logits[1::2]) ** 2)
        loss = loss + common.WEIGHT_DECAY * sum(torch.sum(p * p) for p in self.params) / 2
        for p in self.params:
            p.grad = None
        loss.backward()
        grads = [p.grad for p in self.params]
        d, m = common.RMSPROP_DECAY, common.MOMENTUM
        with torch.no_grad():  # tf.train.RMSPropOptimizer
            torch._foreach_mul_(self.ms, d)
            torch._foreach_addcmul_(self.ms, grads, grads, value=1.0 - d)
            denom = torch._foreach_add(self.ms, common.RMSPROP_EPSILON)
            torch._foreach_sqrt_(denom)
            torch._foreach_mul_(self.mom, m)
            torch._foreach_addcdiv_(self.mom, grads, denom, value=common.LEARNING_RATE)
            torch._foreach_sub_(self.params, self.mom)
            self.step_count += 1
            s = self.step_count
            decay = min(common.MOVING_AVERAGE_DECAY, (1.0 + s) / (10.0 + s))
            torch._foreach_lerp_(self.ema, self.params + self.buffers, 1.0 - decay)
        return loss.detach()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (inductor)")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (oneDNN's fast path on CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    impl = ("pytorch-compile" if args.compile else "pytorch-eager") + (
        "-nhwc" if args.channels_last else "-nchw")
    bench = ALPBench(args, fmt)
    records = []
    for batch in common.csv(args.batch, int):
        images = (torch.rand(batch, 3, args.image_size, args.image_size) * 2 - 1).contiguous(
            memory_format=fmt)
        labels = torch.randint(0, args.num_classes, (batch,))
        attacks = common.csv(args.attack)
        for attack in attacks:
            for part in common.csv(args.parts):
                if part == "clean" and attack != attacks[0]:
                    continue
                times, first, cpu = common.time_steps(
                    lambda p=part, a=attack, x=images, y=labels: bench.run(p, x, y, a),
                    args.warmup, args.steps)
                rec = common.record(args, impl, part, batch, attack, times, first, cpu,
                                    torch_version=torch.__version__,
                                    threads=torch.get_num_threads())
                records.append(rec)
                common.emit(rec, args.json)
    print(common.table(records), flush=True)
    return records


if __name__ == "__main__":
    main()
