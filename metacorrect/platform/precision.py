"""The numeric precision of training steps (`train.precision`)."""
from __future__ import annotations

import contextlib

import torch

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def step_precision(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a training step runs in: nothing for fp32 (the arithmetic is exactly as without it); for
    bf16 and fp16, autocast on the device's type, so every forward, JVP and gradient inside the step, the meta
    passes included, multiplies in half precision while parameters, label tables and optimizer state stay fp32.
    fp16 also needs the method's loss scales (`methods.engine.scaling`), which `train.precision` switches on."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=HALF[precision])
