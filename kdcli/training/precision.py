"""Mixed precision: native bf16 on CUDA where the GPU has it, else fp16 with loss scaling; fp32 on CPU."""

from __future__ import annotations

from contextlib import nullcontext

import torch


class MixedPrecision:
    """Autocast and the backward/step that goes with it. `torch.cuda.is_bf16_supported()` also counts bf16 that
    is emulated (slowly, in fp32) on GPUs without it; such GPUs get fp16 and a GradScaler instead."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        native_bf16 = self.enabled and torch.cuda.is_bf16_supported(including_emulation=False)
        self.dtype = torch.bfloat16 if native_bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and not native_bf16 else None

    def autocast(self):
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else nullcontext()

    def backward(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
