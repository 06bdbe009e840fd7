from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch

from drmguard_engine.errors import ConfigError
from drmguard_engine.models import RegressionNet, build_model, list_archs

# Standard ONNX ops the models may use (the serving side keeps an allow-list of this kind).
ALLOWED_OPS = {
    "Conv",
    "BatchNormalization",
    "Relu",
    "MaxPool",
    "GlobalAveragePool",
    "ReduceMean",
    "Flatten",
    "Gemm",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Clip",
    "Constant",
    "Reshape",
    "Identity",
}


def test_registry_lists_all_archs() -> None:
    assert list_archs() == ["mobilenetv1", "resnet18", "resnet34", "tiny"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "mobilenetv1", "tiny"])
@pytest.mark.parametrize("task,d", [("gaze", 2), ("headpose", 3)])
def test_split_forward_equals_head_of_features(arch: str, task: str, d: int) -> None:
    model = build_model(arch, task, input_size=32, width=0.25, seed=1).eval()
    assert isinstance(model, RegressionNet)
    x = torch.rand(3, 3, 32, 32)
    feats = model.features(x)
    assert feats.shape == (3, model.feature_dim)
    assert (feats >= 0).all()  # post-ReLU, post-GAP
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == d
    torch.testing.assert_close(model(x), model.head(feats))


def test_width_scales_channels_and_resnet18_default_is_512() -> None:
    assert build_model("resnet18", "gaze", width=1.0).feature_dim == 512
    assert build_model("resnet18", "gaze", width=0.25).feature_dim == 128
    assert build_model("mobilenetv1", "gaze", width=0.25).feature_dim == 256


@pytest.mark.parametrize("size", [64, 112])
def test_any_input_size(size: int) -> None:
    model = build_model("resnet18", "headpose", input_size=size, width=0.125).eval()
    assert model(torch.rand(2, 3, size, size)).shape == (2, 3)
    assert model.input_shape == (3, size, size)


def test_seed_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("tiny", "gaze", seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_model("tiny", "gaze", seed=5)
    c = build_model("tiny", "gaze", seed=6)
    assert all(
        torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.head.weight, c.head.weight)


def test_normalisation_is_inside_the_model() -> None:
    model = build_model("tiny", "gaze")
    x = torch.full((1, 3, 16, 16), 0.5)
    z = model.normalize(x)
    assert torch.allclose(
        z[0, :, 0, 0], (0.5 - model.normalize.mean.flatten()) / model.normalize.std.flatten()
    )


@pytest.mark.parametrize("bad", [dict(arch="vgg"), dict(width=0), dict(input_size=16)])
def test_bad_config_raises(bad: dict) -> None:
    kw = dict(arch="resnet18", task="gaze", input_size=64, width=0.25) | bad
    with pytest.raises(ConfigError):
        build_model(**kw)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv1", "tiny"])
def test_onnx_export_uses_standard_ops_and_matches(arch: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build_model(arch, "gaze", input_size=32, width=0.25, seed=0).eval()
    x = torch.rand(2, 3, 32, 32)
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (x,),
        buf,
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        opset_version=17,
        dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
    )
    proto = onnx.load_from_string(buf.getvalue())
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= ALLOWED_OPS, ops - ALLOWED_OPS
    assert "Gemm" in ops
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"input": x.numpy()})
    np.testing.assert_allclose(out, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
