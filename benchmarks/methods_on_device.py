"""Every method's training step on a device (a GPU where torch sees one), checked against the same steps on the CPU.

The method tests run on the CPU; this is the check for a GPU node. Each registered method trains a tiny student
(small_cnn of width 4, 8x8x1 random images, 10 classes, the method tests' settings) for a few steps:

- float64: the learned state (student, meta-model, label table, class weights, EMA) after the steps on the
  device against the same steps on the CPU (not for IEG, whose random draws come from the device's generator),
  and the fast meta-gradient against the exact one (k = 1) on the
  device: largest absolute difference;
- bf16 and fp16 (autocast on the device; fp16 with the method's loss scales, from 2^10): every step's losses
  finite, the steps fp16 skipped for overflow, and the parameters, label table and optimizer state still fp32
  on the device.

Prints one row per method; exits 1 if a check fails.

    python benchmarks/methods_on_device.py                # cuda if torch sees one, else cpu
    python benchmarks/methods_on_device.py --device cuda --steps 5
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metacorrect.config import ExperimentConfig  # noqa: E402
from metacorrect.methods import METHODS  # noqa: E402
from metacorrect.methods.backbones import build_backbone  # noqa: E402
from metacorrect.methods.base import Batch, Method, MethodContext  # noqa: E402
from metacorrect.platform.collective import Collective  # noqa: E402
from metacorrect.platform.precision import step_precision  # noqa: E402

CLASSES, SIDE, WIDTH, NOISY = 10, 8, 4, 64
# Fields that make a method learn from its first step on tiny data (warm-up off, label steps that move labels).
FIELDS = {"mslg": {"warmup_epochs": 0, "label_lr": 50.0}, "soft_labels": {"label_lr": 20.0}}
SAME_TOL = 1e-7  # float64 on two devices, or fast vs exact: the same arithmetic up to summation order (which
# the label steps' large learning rates amplify to ~1e-8 in 3 steps); a bug shows as 1e-3 and more
# IEG draws its MixUp pairs and weights on the training device, from that device's generator: seeded alike,
# a GPU draws other numbers than the CPU, so its runs differ from the CPU's (each repeats itself on its device).
DRAWS_ON_DEVICE = {"ieg"}


def make(name: str, device: torch.device, precision: str = "fp32", **fields) -> Method:
    cfg = ExperimentConfig.from_dict({"method": {"name": name, **FIELDS.get(name, {}), **fields},
                                      "model": {"arch": "small_cnn", "width": WIDTH},
                                      "train": {"precision": precision}})
    torch.manual_seed(0)
    model = build_backbone("small_cnn", CLASSES, (SIDE, SIDE, 1), WIDTH).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return METHODS[name](MethodContext(cfg, model, optimizer, CLASSES, NOISY, Collective(device=device)))


def batches(steps: int, device: torch.device, views: int) -> list[tuple[Batch, Batch]]:
    """The same random (noisy, clean) pairs on any device: drawn on the CPU, then moved."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randperm(NOISY, generator=g)[:16]
        x = torch.randn(16, 1, SIDE, SIDE, generator=g)
        extra = torch.randn(views, 16, 1, SIDE, SIDE, generator=g) if views else None
        noisy = Batch(ids.to(device), x.to(device), torch.randint(0, CLASSES, (16,), generator=g).to(device), 16.0,
                      views=None if extra is None else extra.to(device))
        clean = Batch(torch.arange(8, device=device), torch.randn(8, 1, SIDE, SIDE, generator=g).to(device),
                      torch.randint(0, CLASSES, (8,), generator=g).to(device), 8.0)
        out.append((noisy, clean))
    return out


def train(method: Method, steps: int, device: torch.device, precision: str = "fp32") -> list[dict[str, float]]:
    outs = []
    for i, (noisy, clean) in enumerate(batches(steps, device, method.strong_views)):
        torch.manual_seed(123 + i)  # EMLC's corruption, IEG's MixUp draw
        with step_precision(precision, device):
            outs.append(method.step(noisy, clean))
    return outs


def learned(method: Method) -> torch.Tensor:
    """Everything the method has learned, flat, in float64 on the CPU."""
    parts = [p.detach().reshape(-1) for p in method.model.parameters()]
    parts += [p.detach().reshape(-1) for p in getattr(method, "meta_params", None) or []]
    if method.table is not None:
        parts.append(method.table.values.nan_to_num(-1.0).reshape(-1))
    if getattr(method, "alpha", None) is not None:
        parts.append(method.alpha.detach().reshape(-1))
    if getattr(method, "ema", None) is not None:
        parts += [p.detach().reshape(-1) for p in method.ema.parameters()]
    return torch.cat([p.to("cpu", torch.float64) for p in parts])


def fp32_on(method: Method, device: torch.device) -> bool:
    tensors = list(method.model.parameters()) + [v for s in method.optimizer.state.values() for v in s.values()
                                                 if torch.is_tensor(v) and v.is_floating_point()]
    if method.table is not None:
        tensors.append(method.table.values)
    return all(t.dtype == torch.float32 and t.device.type == device.type for t in tensors)


def check(name: str, device: torch.device, steps: int) -> dict[str, object]:
    row: dict[str, object] = {"method": name}
    started = time.perf_counter()
    torch.set_default_dtype(torch.float64)
    try:
        on_device, on_cpu = make(name, device), make(name, torch.device("cpu"))
        train(on_device, steps, device)
        train(on_cpu, steps, torch.device("cpu"))
        row["device vs cpu"] = (learned(on_device) - learned(on_cpu)).abs().max().item()
        if "meta_grad" in {f.name for f in dataclasses.fields(METHODS[name].config_class)}:
            fast, exact = make(name, device, meta_grad="fast"), make(name, device, meta_grad="exact")
            train(fast, steps, device)
            train(exact, steps, device)
            row["fast vs exact"] = (learned(fast) - learned(exact)).abs().max().item()
    finally:
        torch.set_default_dtype(torch.float32)
    for precision in ("bf16", "fp16"):
        method = make(name, device, precision)
        if precision == "fp16":  # GradScaler's 2^16 overflows the tiny students' first steps, which are then skipped
            scales = method.loss_scales.state_dict()
            scales["real"]["scale"] = scales["meta"]["grad"]["value"] = 2.0 ** 10
            method.loss_scales.load_state_dict(scales)
        outs = train(method, steps, device, precision)
        finite = all(math.isfinite(v) for out in outs for k, v in out.items() if not k.startswith("fp16_"))
        row[precision] = "ok" if finite and fp32_on(method, device) else "FAILED"
        if precision == "fp16":
            row[precision] += f" ({method.loss_scales.state_dict()['skipped_real']} skipped)"
    row["s"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3, help="training steps per check (default 3)")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{where}, torch {torch.__version__}, {args.steps} steps per check\n")
    print("| method | float64: device vs cpu | float64: fast vs exact | bf16 | fp16 | s |")
    print("|---|---|---|---|---|---|")
    failed = False
    for name in sorted(METHODS):
        row = check(name, device, args.steps)
        same_draws = name not in DRAWS_ON_DEVICE or device.type == "cpu"
        diffs = [row.get("device vs cpu", 0.0) if same_draws else 0.0, row.get("fast vs exact", 0.0)]
        failed |= any(d > SAME_TOL for d in diffs) or "FAILED" in row["bf16"] + row["fp16"]
        cells = [f"{row[k]:.1e}" if k in row else "-" for k in ("device vs cpu", "fast vs exact")]
        cells[0] += "" if same_draws else " (draws on the device)"
        print(f"| {name} | {cells[0]} | {cells[1]} | {row['bf16']} | {row['fp16']} | {row['s']:.1f} |", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
