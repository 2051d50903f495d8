"""Which int8 toolchain should `kdcli export --format int8` use? Measure the candidates installed here on a
distilled student: top-1 and agreement with the fp32 student on the validation split, and CPU latency (batch 1)
and throughput (batch 32), every model timed interleaved with the others (kdcli's own timing, in one run).

    python benchmarks/int8_toolchains.py RUN/student --data synthetic [--threads 2] [--seconds 60]

Candidates (each skipped, with the reason, when its package is missing or it fails):
  ort-qdq / ort-qdq-pc / ort-qop / ort-qop-pc   onnxruntime quantize_static: QDQ or QOperator, per tensor or per
                                                channel (activations uint8, weights int8, MinMax calibration)
  ort-qdq-pc-s8                                 the same with int8 activations
  nncf-onnx                                     NNCF on the ONNX file (QDQ), run by onnxruntime
  openvino-nncf                                 NNCF on the OpenVINO model, run by the OpenVINO runtime
  pt2e-x86                                      torchao PT2E with X86InductorQuantizer, run by torch.compile
Extra packages: pip install openvino nncf torchao (not kdcli dependencies).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from kdcli.data import EvalView, eval_loader, open_data
from kdcli.evaluation.cost import LATENCY, THROUGHPUT, count_macs, measure_interleaved, summarize
from kdcli.evaluation.metrics import agreement, topk_accuracy
from kdcli.evaluation.predictors import OnnxPredictor, TorchPredictor
from kdcli.jobs.export import calibration_batches
from kdcli.models.checkpoint import count_params, load_checkpoint
from kdcli.models.export import export_onnx
from kdcli.models.preprocessing import own_config


class Runner:
    """A name, a logits function and a timed-pass factory, like a kdcli Predictor."""

    def __init__(self, name, logits, forward_pass, size_bytes):
        self.name, self.logits, self.forward_pass, self.size_bytes = name, logits, forward_pass, size_bytes


def ort_runner(name: str, path: Path) -> Runner:
    predictor = OnnxPredictor(path, 0, None)
    return Runner(name, predictor, predictor.forward_pass, path.stat().st_size)


def ort_static(fp32: Path, out: Path, batches, fmt: str, per_channel: bool, activations: str = "uint8") -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader:
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {"input": batch.numpy()}

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                    per_channel=per_channel, weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def nncf_onnx(fp32: Path, out: Path, batches) -> Path:
    import nncf
    import onnx

    quantized = nncf.quantize(onnx.load(str(fp32)), nncf.Dataset([{"input": b.numpy()} for b in batches]),
                              subset_size=sum(len(b) for b in batches))
    onnx.save(quantized, str(out))
    return out


def openvino_nncf(fp32: Path, out: Path, batches, threads: int) -> Runner:
    import nncf
    import openvino as ov

    core = ov.Core()
    model = ov.convert_model(str(fp32))
    quantized = nncf.quantize(model, nncf.Dataset([b.numpy() for b in batches]),
                              subset_size=sum(len(b) for b in batches))
    ov.save_model(quantized, str(out))
    compiled = core.compile_model(quantized, "CPU", {"INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()

    def logits(images):
        return torch.from_numpy(np.array(request.infer({0: images.numpy()})[0])).float()

    def forward_pass(batch, size):
        feed = np.zeros((batch, 3, size, size), dtype=np.float32)
        return lambda: request.infer({0: feed})

    return Runner("openvino-nncf", logits, forward_pass, out.stat().st_size + out.with_suffix(".bin").stat().st_size)


def pt2e_x86(model: torch.nn.Module, size: int, batches) -> Runner:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = (torch.zeros(2, 3, size, size),)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, example, dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for b in batches:
            prepared(b)
    converted = convert_pt2e(prepared)
    compiled = torch.compile(converted)

    @torch.no_grad()
    def logits(images):
        return compiled(images).float()

    def forward_pass(batch_size, image_size):
        images = torch.zeros(batch_size, 3, image_size, image_size)
        return lambda: logits(images).sum().item()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pt2e.pt2"
        torch.export.save(torch.export.export(converted, example, dynamic_shapes=({0: batch},)), str(path))
        size_bytes = path.stat().st_size
    return Runner("pt2e-x86", logits, forward_pass, size_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student")
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seconds", default="60", help="bound on each timing (KDCLI_TIMING_SECONDS)")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--only", default=None, help="comma-separated candidate names")
    args = parser.parse_args()
    os.environ["KDCLI_TIMING_SECONDS"] = args.seconds
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    source = open_data(args.data)
    loaded = load_checkpoint(args.student, None, "student", "--arch")
    model = loaded.model.eval()
    config = own_config(loaded, source.native_size)
    size = config.image_size
    images, labels = map(torch.cat, zip(*eval_loader(EvalView(source.val, config), 256, 0)))
    batches, _ = calibration_batches(source, config, args.calibration_images, seed=0)
    work = Path(tempfile.mkdtemp(prefix="kdcli-int8-"))
    fp32 = export_onnx(loaded, config, work / "model.onnx", count_params(model), count_macs(model, size)).path

    torch_fp32 = TorchPredictor(model)
    runners = [Runner("torch-fp32", torch_fp32, torch_fp32.forward_pass,
                      Path(loaded.weights_path).stat().st_size), ort_runner("ort-fp32", fp32)]
    candidates = {
        "ort-qdq": lambda: ort_runner("ort-qdq", ort_static(fp32, work / "qdq.onnx", batches, "qdq", False)),
        "ort-qdq-pc": lambda: ort_runner("ort-qdq-pc", ort_static(fp32, work / "qdq-pc.onnx", batches, "qdq", True)),
        "ort-qop": lambda: ort_runner("ort-qop", ort_static(fp32, work / "qop.onnx", batches, "qop", False)),
        "ort-qop-pc": lambda: ort_runner("ort-qop-pc", ort_static(fp32, work / "qop-pc.onnx", batches, "qop", True)),
        "ort-qdq-pc-s8": lambda: ort_runner("ort-qdq-pc-s8", ort_static(fp32, work / "qdq-pc-s8.onnx", batches, "qdq",
                                                                        True, "int8")),
        "nncf-onnx": lambda: ort_runner("nncf-onnx", nncf_onnx(fp32, work / "nncf.onnx", batches)),
        "openvino-nncf": lambda: openvino_nncf(fp32, work / "ov.xml", batches, args.threads),
        "pt2e-x86": lambda: pt2e_x86(model, size, batches),
    }
    wanted = args.only.split(",") if args.only else list(candidates)
    for name in wanted:
        started = time.perf_counter()
        try:
            runners.append(candidates[name]())
            print(f"{name}: built in {time.perf_counter() - started:.1f} s", flush=True)
        except Exception as err:  # a benchmark: report and go on
            print(f"{name}: skipped ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})", flush=True)

    logits = {r.name: torch.cat([r.logits(images[i:i + 256]) for i in range(0, len(images), 256)]) for r in runners}
    latency = measure_interleaved({r.name: r.forward_pass(1, size) for r in runners}, LATENCY)
    bulk = measure_interleaved({r.name: r.forward_pass(32, size) for r in runners}, THROUGHPUT)
    reference = logits["torch-fp32"]
    base = summarize(latency["ort-fp32"], LATENCY)["median_ms"]
    print(f"\n{loaded.arch} at {size}px, {len(labels)} validation images of {source.description}; "
          f"{args.threads} threads; {args.calibration_images} calibration images\n")
    print("| toolchain | file KiB | top-1 % | Δ vs fp32 | agreement with fp32 % | latency b1 ms (p10–p90) | "
          "vs ORT fp32 | img/s b32 | reliable |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    fp32_top1 = topk_accuracy(reference, labels, 1)
    for r in runners:
        lat, thr = summarize(latency[r.name], LATENCY), summarize(bulk[r.name], THROUGHPUT)
        top1 = topk_accuracy(logits[r.name], labels, 1)
        print(f"| {r.name} | {r.size_bytes / 1024:.0f} | {top1:.2f} | {top1 - fp32_top1:+.2f} | "
              f"{agreement(logits[r.name], reference):.2f} | {lat['median_ms']:.3f} ({lat['p10_ms']:.3f}–"
              f"{lat['p90_ms']:.3f}) | {base / lat['median_ms']:.2f}× | {32000 / thr['median_ms']:.0f} | "
              f"{'yes' if lat['reliable'] and thr['reliable'] else 'no: ' + (lat['note'] or thr['note'])} |")


if __name__ == "__main__":
    main()
