"""Something that predicts logits: a torch module (any dtype) or an ONNX Runtime session, behind one interface,
so that accuracy, cost and latency are measured the same way whatever runs the model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdcli.evaluation.cost import count_macs


class Predictor(ABC):
    """Images (float32 NCHW, normalised) in, logits (float32, on CPU) out."""

    @property
    @abstractmethod
    def runtime(self) -> str:
        """What runs the model, e.g. 'torch 2.6.0 (cpu, float32)' or 'onnxruntime 1.20.1 (CPUExecutionProvider)'."""

    @property
    @abstractmethod
    def threads(self) -> int:
        """The intra-op threads it computes with."""

    @abstractmethod
    def to(self, device: torch.device) -> Predictor:
        """Run on this device where the runtime can (ONNX Runtime here: CPU)."""

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""

    @abstractmethod
    def forward_pass(self, batch: int, image_size: int) -> Callable[[], None]:
        """A call that runs one forward pass of a fixed batch and returns when it is done (for timing)."""

    @abstractmethod
    def params(self) -> int:
        """Parameters of the model."""

    @abstractmethod
    def macs(self, image_size: int) -> int | None:
        """Multiply-accumulates per image."""


class TorchPredictor(Predictor):
    """A torch module in eval mode, fed in its own floating dtype (fp32, fp16, bf16)."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    @property
    def runtime(self) -> str:
        return f"torch {torch.__version__} ({self.device.type}, {str(self.dtype).removeprefix('torch.')})"

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def to(self, device: torch.device) -> TorchPredictor:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.device, self.dtype, non_blocking=True)).float().cpu()

    def forward_pass(self, batch: int, image_size: int) -> Callable[[], None]:
        images = torch.zeros(batch, 3, image_size, image_size, device=self.device, dtype=self.dtype)

        @torch.no_grad()
        def run() -> None:
            self.model(images)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

        return run

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def macs(self, image_size: int) -> int:
        return count_macs(self.model, image_size, self.device)


class OnnxPredictor(Predictor):
    """An ONNX Runtime session on CPU with as many intra-op threads as torch uses, so the two compare fairly.
    params and MACs are those of the model it was exported from (recorded in the file's metadata)."""

    def __init__(self, path: Path, params: int, macs: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._threads = options.intra_op_num_threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self._params, self._macs, self._version = params, macs, ort.__version__

    @property
    def runtime(self) -> str:
        return f"onnxruntime {self._version} ({', '.join(self.session.get_providers())})"

    @property
    def threads(self) -> int:
        return self._threads

    def to(self, device: torch.device) -> OnnxPredictor:
        return self  # CPU execution provider; the runtime string says so

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: np.ascontiguousarray(images.detach().cpu().float().numpy())}
        return torch.from_numpy(self.session.run(None, feed)[0]).float()

    def forward_pass(self, batch: int, image_size: int) -> Callable[[], None]:
        feed = {self.input_name: np.zeros((batch, 3, image_size, image_size), dtype=np.float32)}
        return lambda: self.session.run(None, feed) and None

    def params(self) -> int:
        return self._params

    def macs(self, image_size: int) -> int | None:
        return self._macs
