"""The export stage: ONNX checked in onnxruntime, TorchScript reloaded, and its error paths."""

from __future__ import annotations

import sys

import onnx
import onnxruntime
import torch

from tests.conftest import read_metrics, synthetic_recipe


def _recipe(*stages):
    recipe = synthetic_recipe()
    recipe["stages"] = [recipe["stages"][0], *stages]
    return recipe


def test_fp32_and_static_int8_export_match_pytorch(nnopt, write_recipe, tmp_path):
    static = {"name": "int8", "kind": "quantize", "method": "static_int8", "calibration_batches": 4}
    recipe = _recipe({"name": "export", "kind": "export"}, static,
                     {"name": "export_int8", "kind": "export", "tolerance": 0.5})
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    fp32 = read_metrics(run_dir, "02-export")
    assert fp32["onnx_max_abs_diff"] <= 1e-4 and fp32["onnx_tolerance"] == 1e-4
    assert fp32["torchscript_max_abs_diff"] == 0.0
    quantized = read_metrics(run_dir, "04-export_int8")
    assert quantized["onnx_max_abs_diff"] <= 0.5 and quantized["onnx_argmax_agreement"] >= 0.95
    graph = onnx.load(str(run_dir / "04-export_int8" / "model.onnx")).graph  # a real int8 graph, not a float copy
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    constants = [a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value"]
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2 for t in [*graph.initializer, *constants])
    session = onnxruntime.InferenceSession(str(run_dir / "02-export" / "model.onnx"))
    batch = torch.randn(7, 32).numpy()  # the batch axis is dynamic
    assert session.run(None, {"input": batch})[0].shape == (7, 10)
    assert torch.jit.load(str(run_dir / "04-export_int8" / "model.ts"))(torch.randn(3, 32)).shape == (3, 10)


def test_dynamic_int8_has_no_onnx_form_but_exports_torchscript(nnopt, write_recipe, tmp_path):
    dynamic = {"name": "int8", "kind": "quantize", "method": "dynamic_int8"}
    code, _, err = nnopt("run", write_recipe(_recipe(dynamic, {"name": "export", "kind": "export"})), "-O", tmp_path)
    assert code == 2 and "stages[2].formats" in err and "dynamic int8" in err and "static_int8" in err
    assert not (tmp_path / "tiny").exists()  # refused before anything trained
    recipe = _recipe(dynamic, {"name": "export", "kind": "export", "formats": ["torchscript"]})
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    assert read_metrics(tmp_path / "tiny", "03-export")["torchscript_max_abs_diff"] == 0.0


def test_missing_onnxruntime_is_reported_before_anything_runs(nnopt, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the `onnx` extra were not installed
    code, _, err = nnopt("run", write_recipe(_recipe({"name": "export", "kind": "export"})), "-O", tmp_path)
    err = " ".join(err.split())  # rich wraps long lines
    assert code == 2 and "`onnxruntime`, which is not installed" in err and "nnopt[onnx]" in err
    assert not (tmp_path / "tiny").exists()
