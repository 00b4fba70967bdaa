"""ONNX export of 3-D models (spatial_dims=3): the same graph with Conv, ConvTranspose, MaxPool,
BatchNormalization, Resize, Concat and Slice on (N, C, D, H, W), run by ONNX Runtime in float32
against model.predict; symbolic D, H, W."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import unet_np  # noqa: E402
from unet_np.onnx_export import export_onnx  # noqa: E402

from tests.onnx_helpers import TOL32, TOL64, randomise, rel, session  # noqa: E402,F401


def _unet(**kw):
    return unet_np.UNet(1, 2, depth=2, base_channels=2, spatial_dims=3, **kw)


# each model with two input shapes (batch and D, H, W all change: one file takes both)
CASES = {
    "unet-same": (lambda: _unet(), [(2, 1, 8, 12, 4), (1, 1, 4, 4, 8)]),
    "unet-batchnorm-trilinear": (lambda: _unet(batchnorm=True, upsample="bilinear"),
                                 [(2, 1, 8, 4, 12), (1, 1, 4, 8, 8)]),
    "unet-valid": (lambda: _unet(padding="valid"), [(1, 1, 44, 44, 44), (2, 1, 44, 52, 44)]),
    "unet-pad-input": (lambda: _unet(pad_input=True), [(2, 1, 5, 9, 6), (1, 1, 8, 7, 4)]),
    "unet++": (lambda: unet_np.UNetPlusPlus(1, 2, depth=2, base_channels=4, batchnorm=True,
                                            spatial_dims=3), [(2, 1, 4, 8, 4), (1, 1, 8, 4, 4)]),
    "attention": (lambda: unet_np.AttentionUNet(1, 2, depth=2, base_channels=2, pad_input=True,
                                                spatial_dims=3), [(2, 1, 4, 6, 7), (1, 1, 8, 4, 4)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnxruntime_matches_predict_3d(case, tmp_path):
    build, shapes = CASES[case]
    model = randomise(build())
    path = export_onnx(model, tmp_path / "m.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    sess = session(path)
    rng = np.random.default_rng(1)
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        y = sess.run(None, {"input": x})[0]
        ref = model.predict(x)
        # not a dead network (with base 2, UNet++ gave one value everywhere: any graph matched it)
        assert len(np.unique(ref)) > ref.size // 4
        assert y.ndim == 5 and y.shape[:2] == (shape[0], 2)
        assert rel(y, ref) < TOL32, case
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 1, "D", "H", "W"]
    out = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert out == (["N", 2, "D_out", "H_out", "W_out"] if "valid" in case else ["N", 2, "D", "H", "W"])
    ops = {n.op_type for n in graph.node}
    assert {"Conv", "MaxPool", "Concat"} <= ops


def test_3d_kernels_and_pads_in_the_graph(tmp_path):
    """The 3-D attributes: kernels of three, pads listing the three starts then the three ends,
    linear Resize with five scales."""
    model = randomise(_unet(upsample="bilinear"))
    graph = onnx.load(str(export_onnx(model, tmp_path / "m.onnx"))).graph
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
             for n in graph.node}
    convs = [a for n, a in attrs.items() if "kernel_shape" in a and "enc1" in n]
    assert convs and all(a["kernel_shape"] == [3, 3, 3] and a["pads"] == [1] * 6 for a in convs)
    pools = [n for n in graph.node if n.op_type == "MaxPool"]
    assert pools and all(attrs[n.name]["kernel_shape"] == [2, 2, 2] for n in pools)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    scales = [inits[n.input[2]] for n in graph.node if n.op_type == "Resize"]
    assert scales and all(list(s) == [1, 1, 2, 2, 2] for s in scales)


def test_float64_3d_graph_with_reference_evaluator(tmp_path):
    from onnx.reference import ReferenceEvaluator
    model = randomise(unet_np.UNet(1, 2, depth=1, base_channels=2, spatial_dims=3, dtype="float64",
                                   batchnorm=True, pad_input=True))
    proto = onnx.load(str(export_onnx(model, tmp_path / "m64.onnx", dtype="float64")))
    x = np.random.default_rng(4).standard_normal((1, 1, 3, 5, 4))
    y = ReferenceEvaluator(proto).run(None, {"input": x})[0]
    assert y.dtype == np.float64 and rel(y, model.predict(x)) < TOL64
