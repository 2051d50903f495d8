"""Training arithmetic (--precision): auto is native bf16 on CUDA where the GPU has it, else fp16 with loss
scaling, and fp32 on CPU; fp32 everywhere; or bf16 autocast, on CPU too (fast where the CPU has bf16
instructions, e.g. AVX512-BF16 or AMX: benchmarks/model_side.py)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from kdcli.errors import KdcliError

CHOICES = ("auto", "fp32", "bf16")


class MixedPrecision:
    """Autocast and the backward/step that goes with it. `torch.cuda.is_bf16_supported()` also counts bf16 that
    is emulated (slowly, in fp32) on GPUs without it; such GPUs get fp16 and a GradScaler instead."""

    def __init__(self, device: torch.device, choice: str = "auto"):
        if choice not in CHOICES:
            raise KdcliError(f"--precision {choice}: choose one of {', '.join(CHOICES)}")
        cuda = device.type == "cuda"
        native_bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
        if choice == "bf16" and cuda and not native_bf16:
            raise KdcliError("--precision bf16: this GPU has no native bf16; use --precision auto (fp16 with loss "
                             "scaling) or fp32")
        self.device_type = device.type
        self.enabled = choice == "bf16" or (choice == "auto" and cuda)
        self.dtype = torch.bfloat16 if choice == "bf16" or native_bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and self.dtype == torch.float16 else None

    @property
    def name(self) -> str:
        return ("bf16" if self.dtype == torch.bfloat16 else "fp16") if self.enabled else "fp32"

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
