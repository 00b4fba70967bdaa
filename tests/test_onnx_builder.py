"""ONNX export of GeneralUNet (unet_np.models.builder), the model unet_np.interop builds for
milesial's UNet, MONAI's BasicUNet and nnU-Net's PlainConvUNet: each converter's configuration (and
the builder's other choices: group norm, instance norm with running statistics, both align_corners,
Resize then 1x1 conv, dropout), 2-D and 3-D, random weights and perturbed statistics, run by ONNX
Runtime in float32 against model.predict (relative error < 1e-4), and by onnx.reference in float64
(< 1e-10). With torch and the peers installed, the converters' own models (from the peers' random
weights) export too."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from unet_np import interop  # noqa: E402
from unet_np.models.builder import GeneralUNet  # noqa: E402
from unet_np.onnx_export import build_onnx, export_onnx  # noqa: E402

from tests.onnx_helpers import TOL32, TOL64, rel, session  # noqa: E402
from tests.onnx_helpers import randomise as randomise_with  # noqa: E402


def randomise(model, seed=0):
    """Non-trivial weights (std 0.4), affine norm parameters and running statistics; eval mode."""
    return randomise_with(model, seed, scale=0.4)


def milesial(bilinear, b=2):
    """from_milesial's configuration (base width b instead of 64)."""
    f = 2 if bilinear else 1
    ch = [b, 2 * b, 4 * b, 8 * b, 16 * b // f]
    dec = [[b, b], [2 * b, b], [4 * b, 2 * b], [8 * b, 4 * b]] if bilinear else [[c, c] for c in ch[:4]]
    return dict(channels=ch, decoder_convs=dec, downsample="maxpool",
                upsample="bilinear" if bilinear else "transpose", align_corners=True, concat="skip_up",
                norm="batch", act="relu", order="CNA", conv_bias=False)


def monai(spatial_dims, fea=(3, 4, 4, 5, 6, 3), norm="instance", norm_kwargs=None, act="leaky_relu",
          bias=True, dropout=0.0):
    """from_monai_basicunet's configuration."""
    return dict(channels=list(fea[:5]), decoder_convs=[[fea[5]] * 2, [fea[1]] * 2, [fea[2]] * 2, [fea[3]] * 2],
                up_channels=[fea[1], fea[2] // 2, fea[3] // 2, fea[4] // 2], spatial_dims=spatial_dims,
                downsample="maxpool", upsample="transpose", concat="skip_up", norm=norm,
                norm_kwargs=dict({"affine": True} if norm_kwargs is None else norm_kwargs), act=act,
                negative_slope=0.1, order="CNDA", conv_bias=bias, dropout=dropout)


def nnunet(dims, deep=False, nonlin_first=False, dropout=0.0, norm="instance"):
    """from_nnunet's configuration for the small PlainConvUNet of tests/test_interop.py."""
    k = [[1, 3], [3, 3], [3, 3]] if dims == 2 else [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    s = [[1, 1], [1, 2], [2, 2]] if dims == 2 else [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
    feats, n_conv, n_dec = [3, 4, 5], [2, 1, 2], [1, 2]
    order = ("CD" if dropout else "C") + ("AN" if nonlin_first else "NA")
    return dict(channels=feats, encoder_convs=[[c] * n for c, n in zip(feats, n_conv)],
                decoder_convs=[[feats[l]] * n_dec[1 - l] for l in range(2)], spatial_dims=dims,
                kernel_sizes=k, strides=s, downsample="conv", upsample="transpose", concat="up_skip",
                norm=norm, norm_kwargs={"eps": 1e-5, "affine": True}, act="leaky_relu", negative_slope=0.01,
                order=order, conv_bias=True, up_bias=True, dropout=dropout, heads="all",
                deep_supervision=deep, module_order="by_kind")


def other(dims, **kw):
    """The builder's choices no converter uses (yet)."""
    base = dict(channels=[4, 8, 8], spatial_dims=dims, downsample="maxpool", upsample="transpose",
                concat="up_skip", norm=None, act="relu")
    base.update(kw)
    return base


# name -> (GeneralUNet options, two input shapes (N, C_in=2, *S))
CASES = {
    "milesial-transpose": (milesial(False), [(2, 2, 16, 32), (1, 2, 32, 16)]),
    "milesial-bilinear": (milesial(True), [(2, 2, 16, 32), (1, 2, 32, 16)]),
    "monai-2d-instance-leaky": (monai(2), [(2, 2, 16, 32), (1, 2, 32, 16)]),
    "monai-2d-batch-relu-nobias": (monai(2, norm="batch", norm_kwargs={}, act="relu", bias=False),
                                   [(2, 2, 16, 32), (1, 2, 32, 16)]),
    "monai-2d-dropout": (monai(2, dropout=0.3), [(2, 2, 16, 32)]),
    "monai-3d": (monai(3), [(1, 2, 16, 16, 32), (2, 2, 16, 32, 16)]),
    "nnunet-2d": (nnunet(2), [(2, 2, 8, 16), (1, 2, 12, 8)]),
    "nnunet-2d-deep": (nnunet(2, deep=True), [(2, 2, 8, 16)]),
    "nnunet-2d-nonlin-first-dropout": (nnunet(2, nonlin_first=True, dropout=0.2), [(2, 2, 8, 16)]),
    "nnunet-3d": (nnunet(3), [(2, 2, 4, 8, 8), (1, 2, 6, 4, 12)]),
    "group-norm-2d": (other(2, norm="group", norm_kwargs={"num_groups": 2}), [(2, 2, 8, 12), (1, 2, 4, 8)]),
    "group-norm-3d-no-affine": (other(3, norm="group", norm_kwargs={"num_groups": 4, "affine": False},
                                      act="leaky_relu", negative_slope=0.2), [(2, 2, 4, 8, 4)]),
    "instance-running-stats-3d": (other(3, norm="instance",
                                        norm_kwargs={"affine": True, "track_running_stats": True}),
                                  [(2, 2, 4, 4, 8)]),
    "instance-no-affine-2d": (other(2, norm="instance"), [(2, 2, 8, 8)]),
    "bilinear-half-pixel-2d": (other(2, upsample="bilinear", align_corners=False, concat="skip_up"),
                               [(2, 2, 8, 12)]),
    "trilinear-align-corners-3d": (other(3, upsample="trilinear", align_corners=True, norm="batch"),
                                   [(2, 2, 4, 8, 4)]),
    "bilinear-conv-3d": (other(3, upsample="bilinear_conv", up_channels=[3, 5]),
                         [(1, 2, 8, 4, 4)]),
    "strided-conv-5x5-nobias-2d": (other(2, downsample="conv", kernel_sizes=5, conv_bias=False,
                                         up_bias=False, norm="batch", order="CAN"), [(2, 2, 8, 8)]),
}


def check_against_predict(model, shapes, path):
    """ORT float32 against model.predict on each shape; returns the worst relative error."""
    export_onnx(model, path)
    onnx.checker.check_model(str(path), full_check=True)
    sess = session(path)
    rng = np.random.default_rng(1)
    worst = 0.0
    for shape in shapes:
        x = rng.standard_normal(shape).astype(np.float32)
        (y,) = sess.run(None, {"input": x})
        ref = model.predict(x)
        ref = ref[0] if isinstance(ref, list) else ref        # deep supervision: the level-0 head
        # not a dead network (one value everywhere would let a wrong graph match)
        assert len(np.unique(ref)) > ref.size // 4
        assert y.shape == ref.shape == (shape[0], model.num_classes) + tuple(shape[2:])
        worst = max(worst, rel(y, ref))
    return worst


@pytest.mark.parametrize("case", list(CASES))
def test_general_unet_onnxruntime_matches_predict(case, tmp_path):
    options, shapes = CASES[case]
    model = randomise(GeneralUNet(2, 3, dtype=np.float32, **options))
    err = check_against_predict(model, shapes, tmp_path / "m.onnx")
    assert err < TOL32, (case, err)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    axes = ["D", "H", "W"][-model.spatial_dims:]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 2, *axes]
    assert len(graph.output) == 1                           # deep supervision: one head exported


def test_graph_operators():
    """Each choice becomes the operator the module docstring names."""
    def ops(**kw):
        return {n.op_type for n in build_onnx(randomise(GeneralUNet(2, 3, **kw))).graph.node}
    nn_ops = ops(**nnunet(3))
    assert {"Conv", "InstanceNormalization", "LeakyRelu", "ConvTranspose", "Concat"} <= nn_ops
    assert "MaxPool" not in nn_ops and "Dropout" not in nn_ops
    assert {"MaxPool", "BatchNormalization", "Resize", "Relu"} <= ops(**milesial(True))
    group = ops(**other(2, norm="group", norm_kwargs={"num_groups": 2}))
    assert {"Reshape", "InstanceNormalization", "Mul", "Add"} <= group and "GroupNormalization" not in group
    running = ops(**other(2, norm="instance", norm_kwargs={"track_running_stats": True}))
    assert "BatchNormalization" in running and "InstanceNormalization" not in running
    assert "Dropout" not in ops(**monai(2, dropout=0.5))


@pytest.mark.parametrize("order", ["up_skip", "skip_up"])
def test_concat_order_is_the_models(order):
    """The Concat's inputs follow the model's order (a swapped order gives other logits, so the ORT
    comparison would catch it too; here the graph says it)."""
    proto = build_onnx(randomise(GeneralUNet(1, 2, **other(2, concat=order))))
    cats = [n for n in proto.graph.node if n.op_type == "Concat"]
    assert cats and all(n.input[0].startswith("up" if order == "up_skip" else "enc") for n in cats)


@pytest.mark.parametrize("case", ["group-norm-3d-no-affine", "nnunet-2d-deep", "instance-running-stats-3d",
                                  "milesial-bilinear"])
def test_float64_reference_evaluator(case):
    from onnx.reference import ReferenceEvaluator
    options, shapes = CASES[case]
    model = randomise(GeneralUNet(2, 3, dtype=np.float64, **options))
    x = np.random.default_rng(2).standard_normal(shapes[0])
    y = ReferenceEvaluator(build_onnx(model, dtype="float64")).run(None, {"input": x})[0]
    ref = model.predict(x)
    ref = ref[0] if isinstance(ref, list) else ref
    assert rel(y, ref) < TOL64


def test_train_mode_is_exported_as_eval():
    """The graph is always the inference network: dropout off, running statistics used."""
    options, shapes = CASES["monai-2d-dropout"]
    model = randomise(GeneralUNet(2, 3, dtype=np.float32, **options))
    proto = build_onnx(model.train())
    model.eval()
    x = np.random.default_rng(3).standard_normal(shapes[0]).astype(np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    assert rel(y, model.predict(x)) < TOL32


# -- the converters' own models, from the peers' random weights -----------------------------------------
def test_converters_own_models_export(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    from tests.test_interop import MilesialUNet, nnunet_architecture, nnunet_peer
    built = [(interop.from_milesial(MilesialUNet(2, 3, bilinear=True, b=2).state_dict(), 2, 3, bilinear=True,
                                    base_channels=2, dtype=np.float32), [(1, 2, 32, 16)])]
    arch = nnunet_architecture(3)
    built.append((interop.from_nnunet(nnunet_peer(arch, 2, 3, True).state_dict(), arch, 2, 3,
                                      deep_supervision=True, dtype=np.float32), [(2, 2, 4, 8, 8)]))
    try:
        from monai.networks.nets import BasicUNet
        kw = dict(spatial_dims=3, in_channels=2, out_channels=3, features=(3, 4, 4, 5, 6, 3))
        built.append((interop.from_monai_basicunet(BasicUNet(**kw).state_dict(), dtype=np.float32, **kw),
                      [(1, 2, 16, 16, 32)]))
    except ImportError:
        pass
    for i, (model, shapes) in enumerate(built):
        randomise(model, seed=i)
        assert check_against_predict(model, shapes, tmp_path / f"m{i}.onnx") < TOL32


def test_config_mirrors_the_converters():
    """The options above are the converters' own (so the cases test what they build)."""
    torch = pytest.importorskip("torch")
    from tests.test_interop import MilesialUNet, nnunet_architecture, nnunet_peer
    keys = ("channels", "encoder_convs", "decoder_convs", "up_channels", "downsample", "upsample", "concat",
            "norm", "act", "order", "conv_bias", "strides", "kernel_sizes", "heads", "spatial_dims")
    ref = interop.from_milesial(MilesialUNet(2, 3, bilinear=True, b=2).state_dict(), 2, 3, bilinear=True,
                                base_channels=2).config()
    mine = GeneralUNet(2, 3, **milesial(True)).config()
    assert {k: mine[k] for k in keys} == {k: ref[k] for k in keys}
    arch = nnunet_architecture(3)
    ref = interop.from_nnunet(nnunet_peer(arch, 2, 3, False).state_dict(), arch, 2, 3).config()
    mine = GeneralUNet(2, 3, **nnunet(3)).config()
    assert {k: mine[k] for k in keys} == {k: ref[k] for k in keys}
    del torch


def test_saved_general_unet_exports_after_loading(tmp_path):
    """save -> load_model -> export_onnx (what `unet-np export --model` does) keeps the graph."""
    import unet_np
    options, shapes = CASES["nnunet-2d-deep"]
    model = randomise(GeneralUNet(2, 3, dtype=np.float32, **options))
    model.save(tmp_path / "m.npz")
    loaded = unet_np.load_model(tmp_path / "m.npz").eval()
    assert type(loaded) is GeneralUNet
    assert check_against_predict(loaded, shapes, tmp_path / "m.onnx") < TOL32
    x = np.random.default_rng(1).standard_normal(shapes[0]).astype(np.float32)
    assert rel(loaded.predict(x)[0], model.predict(x)[0]) == 0
