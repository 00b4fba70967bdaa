"""ONNX export: the exported graph, run by ONNX Runtime (float32) or by onnx's own reference evaluator
(float64), gives model.predict's output; the file passes onnx.checker; batch and size are dynamic."""
import os
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import unet_np  # noqa: E402
from unet_np.onnx_export import build_onnx, export_onnx  # noqa: E402

from tests.onnx_helpers import TOL32, TOL64, randomise, rel, session  # noqa: E402,F401


def run_ort(path, x):
    return session(path).run(None, {"input": x})[0]


CASES = {
    "unet-same": (lambda: unet_np.UNet(1, 3, depth=2, base_channels=4), [(2, 1, 16, 16)]),
    "unet-valid": (lambda: unet_np.UNet(1, 2, depth=2, base_channels=4, padding="valid"),
                   [(2, 1, 44, 44)]),
    "unet-batchnorm": (lambda: unet_np.UNet(2, 3, depth=2, base_channels=4, batchnorm=True),
                       [(2, 2, 16, 16)]),
    "unet-bilinear": (lambda: unet_np.UNet(1, 2, depth=3, base_channels=4, upsample="bilinear"),
                      [(2, 1, 16, 24)]),
    "unet-noskip": (lambda: unet_np.UNet(1, 2, depth=2, base_channels=4, skip=False), [(2, 1, 16, 16)]),
    "unet-pad-input": (lambda: unet_np.UNet(1, 2, depth=2, base_channels=4, pad_input=True),
                       [(2, 1, 17, 19)]),
    "unet++-deep-supervision": (lambda: unet_np.UNetPlusPlus(1, 2, depth=3, base_channels=4,
                                                             deep_supervision=True), [(2, 1, 16, 16)]),
    "unet++-pruned": (lambda: unet_np.UNetPlusPlus(1, 2, depth=3, base_channels=4,
                                                   deep_supervision=True).prune(2), [(2, 1, 16, 16)]),
    "unet++-bn-bilinear": (lambda: unet_np.UNetPlusPlus(1, 2, depth=2, base_channels=4, batchnorm=True,
                                                        upsample="bilinear"), [(1, 1, 8, 16)]),
    "attention": (lambda: unet_np.AttentionUNet(1, 2, depth=2, base_channels=4), [(2, 1, 16, 16)]),
    "attention-bn-bilinear-pad": (lambda: unet_np.AttentionUNet(1, 2, depth=2, base_channels=4,
                                                                batchnorm=True, upsample="bilinear",
                                                                pad_input=True), [(2, 1, 15, 18)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_matches_predict_float32(case, tmp_path):
    build, shapes = CASES[case]
    model = randomise(build())
    path = export_onnx(model, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    rng = np.random.default_rng(1)
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        assert rel(run_ort(path, x), model.predict(x)) < TOL32


def test_unet_plus_plus_exports_the_pruned_head(tmp_path):
    model = randomise(unet_np.UNetPlusPlus(1, 2, depth=3, base_channels=4, deep_supervision=True))
    x = np.random.default_rng(2).standard_normal((1, 1, 16, 16)).astype(np.float32)
    full = run_ort(export_onnx(model, tmp_path / "full.onnx"), x)
    model.prune(1)
    pruned_file = export_onnx(model, tmp_path / "l1.onnx")
    pruned = run_ort(pruned_file, x)
    assert rel(pruned, model.predict(x)) < TOL32
    assert rel(pruned, full) > 1e-3          # really a different sub-network
    # the pruned graph holds none of the deeper nodes
    names = {i.name for i in onnx.load(str(pruned_file)).graph.initializer}
    assert not any(n.startswith(("x2_", "x3_", "x1_1.", "final3")) for n in names)


def test_dynamic_batch_and_size(tmp_path):
    """One file, several batch sizes and spatial sizes (same, valid and pad_input models)."""
    rng = np.random.default_rng(3)
    for build, shapes in [
        (lambda: unet_np.UNet(1, 2, depth=2, base_channels=4, batchnorm=True),
         [(1, 1, 16, 16), (3, 1, 24, 40)]),
        (lambda: unet_np.UNet(1, 2, depth=2, base_channels=4, padding="valid"),
         [(1, 1, 44, 44), (2, 1, 60, 52)]),
        (lambda: unet_np.UNet(1, 2, depth=2, base_channels=4, pad_input=True),
         [(2, 1, 13, 30), (1, 1, 16, 16)]),
        (lambda: unet_np.AttentionUNet(1, 2, depth=2, base_channels=4), [(1, 1, 8, 8), (4, 1, 32, 16)]),
    ]:
        model = randomise(build())
        sess = session(export_onnx(model, tmp_path / "m.onnx"))
        for shape in shapes:
            x = rng.standard_normal(shape).astype(np.float32)
            y = sess.run(None, {"input": x})[0]
            assert rel(y, model.predict(x)) < TOL32
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, "H", "W"]


@pytest.mark.parametrize("kw,shape", [(dict(batchnorm=True), (2, 1, 16, 16)),
                                      (dict(padding="valid"), (1, 1, 44, 44)),
                                      (dict(upsample="bilinear", pad_input=True), (2, 1, 15, 17))])
def test_float64_graph_with_reference_evaluator(kw, shape, tmp_path):
    """float64 models export float64 graphs on request (ONNX Runtime's CPU Conv is float32-only, so
    the onnx package's NumPy reference evaluator runs them)."""
    from onnx.reference import ReferenceEvaluator
    model = randomise(unet_np.UNet(1, 2, depth=2, base_channels=4, dtype="float64", **kw))
    path = export_onnx(model, tmp_path / "m64.onnx", dtype="float64")
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    x = np.random.default_rng(4).standard_normal(shape)
    y = ReferenceEvaluator(proto).run(None, {"input": x})[0]
    assert y.dtype == np.float64
    assert rel(y, model.predict(x)) < TOL64


def test_float64_model_exported_as_float32_by_default(tmp_path):
    """onnxruntime has no double Conv ('Could not find an implementation for Conv(11)'), so the
    default export of a float64 model is a float32 graph it runs."""
    model = randomise(unet_np.AttentionUNet(1, 2, depth=2, base_channels=4, dtype="float64"))
    path = export_onnx(model, tmp_path / "m.onnx")
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(5).standard_normal((2, 1, 16, 16))
    assert rel(run_ort(path, x.astype(np.float32)), model.predict(x)) < TOL32


def test_opset_choice_and_package_entry_point(tmp_path):
    model = randomise(unet_np.UNet(1, 2, depth=2, base_channels=4, batchnorm=True, pad_input=True))
    x = np.random.default_rng(6).standard_normal((1, 1, 12, 12)).astype(np.float32)
    for opset in (13, 18):
        proto = build_onnx(model, opset=opset)
        assert proto.opset_import[0].version == opset
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        assert rel(sess.run(None, {"input": x})[0], model.predict(x)) < TOL32
    path = unet_np.export_onnx(model, tmp_path / "m.onnx")
    assert rel(run_ort(path, x), model.predict(x)) < TOL32
    assert not hasattr(model, "to_onnx")       # a model never imports the code that exports it


def test_atomic_write_and_errors(tmp_path):
    model = randomise(unet_np.UNet(1, 2, depth=1, base_channels=2))
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    export_onnx(model, target)
    assert onnx.load(str(target)).graph.name == "unet_np.UNet"
    assert os.listdir(tmp_path) == ["m.onnx"]             # no temporary file left behind
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, target, opset=9)
    with pytest.raises(TypeError, match="UNet"):
        export_onnx(unet_np.nn.ReLU(), target)
    with pytest.raises(TypeError, match="float32 or float64"):
        export_onnx(model, target, dtype="float16")
    with pytest.raises(OSError):
        export_onnx(model, tmp_path / "no-such-dir" / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_missing_onnx_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    model = unet_np.UNet(1, 2, depth=1, base_channels=2)
    with pytest.raises(ImportError, match=r"unet-np\[onnx\]"):
        export_onnx(model, tmp_path / "m.onnx")
