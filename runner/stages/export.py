"""`export`: ONNX checked in onnxruntime against PyTorch, and TorchScript checked after reloading."""

from __future__ import annotations

import warnings

import torch

from runner.errors import StageError
from runner.transforms import transforms_of
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.ts"
ONNX_EXTRA_HINT = "install the optional extra: pip install 'nnopt[onnx]' (onnx and onnxruntime), or drop `onnx` from formats"


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _onnx(spec, model, example: torch.Tensor, expected: torch.Tensor, ctx: StageContext) -> dict:
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise StageError(spec.name, f"ONNX export needs `{err.name}`, which is not installed", ONNX_EXTRA_HINT) from None
    if any(t["kind"] == "int8" and t["method"] == "dynamic_int8" for t in transforms_of(model)):
        raise StageError(spec.name, "ONNX has no operator for torch's dynamic int8 Linear (quantized::linear_dynamic)",
                         "quantize with method static_int8 or qat for an int8 ONNX model, or export only `torchscript`")
    path = ctx.folder / ONNX_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        # dynamo=False: the TorchScript-based exporter is the one that maps int8 modules to QDQ operators
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=spec.opset,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx.checker.check_model(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": example.numpy()})[0])
    diff = _max_diff(got, expected)
    if diff > spec.tolerance:
        raise StageError(spec.name, f"onnxruntime differs from PyTorch by {diff:.3g} (tolerance {spec.tolerance:g})",
                         "raise `tolerance` if the difference is acceptable (int8 graphs round differently)")
    return {"onnx_bytes": path.stat().st_size, "onnx_max_abs_diff": diff, "onnx_tolerance": spec.tolerance,
            "onnx_opset": spec.opset, "onnx_argmax_agreement": float((got.argmax(1) == expected.argmax(1)).float().mean())}


def _torchscript(spec, model, example: torch.Tensor, expected: torch.Tensor, ctx: StageContext) -> dict:
    path = ctx.folder / TORCHSCRIPT_FILE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, str(path))
        with torch.inference_mode():
            got = torch.jit.load(str(path))(example)
    diff = _max_diff(got, expected)
    if diff > spec.tolerance:
        raise StageError(spec.name, f"the reloaded TorchScript model differs from PyTorch by {diff:.3g}")
    return {"torchscript_bytes": path.stat().st_size, "torchscript_max_abs_diff": diff}


@STAGES.register("export")
def run(spec, model, ctx: StageContext) -> StageResult:
    model.eval()
    example = ctx.data().examples("test", spec.check_examples)[0]
    with torch.inference_mode():
        expected = model(example)
    metrics: dict = {"check_examples": len(example)}
    for fmt in spec.formats:
        metrics.update((_onnx if fmt == "onnx" else _torchscript)(spec, model, example, expected, ctx))
    return StageResult(model, metrics)
