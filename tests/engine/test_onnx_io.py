"""ONNX export, the hostile-input gate and the interpreter import (drmguard_engine.onnx_io)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from drmguard_engine.errors import ConfigError, UnsupportedModelError
from drmguard_engine.onnx_io import ImportedModel, check_onnx_bytes, export_onnx, load_onnx_model

SIZE = 32
ATOL = 1e-4


class _Block(nn.Module):
    """Depthwise-separable residual block with BatchNorm and a squeeze-excite gate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.se = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn1(self.dw(x)))
        y = self.bn2(self.pw(y))
        gate = torch.sigmoid(self.se(y.mean((2, 3))))[:, :, None, None]
        return F.leaky_relu(x + y * gate, 0.1)


class ZooNet(nn.Module):
    """A small regression net touching many ops: normalisation, BN, depthwise, pools, residuals, resize."""

    def __init__(self, d: int = 2) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1))
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.block = _Block(8)
        self.pool_max = nn.MaxPool2d(3, stride=2, padding=1)
        self.pool_avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.bn_cat = nn.BatchNorm2d(16)  # not after a conv, so the exporter cannot fold it away
        self.mix = nn.Conv2d(16, 12, 3, padding=1, dilation=1)
        self.head = nn.Linear(12 * 2, d)
        self.input_shape = (3, SIZE, SIZE)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = F.hardswish(self.bn(self.stem(x)))  # 16x16
        x = self.block(x)
        a = self.pool_avg(self.pool_max(x))  # 8x8
        b = F.interpolate(F.avg_pool2d(a, 2), scale_factor=2.0, mode="nearest")  # 8x8
        u = F.avg_pool2d(self.up(a), 2)  # 8x8
        x = self.bn_cat(torch.cat([a + b, torch.tanh(u)], 1))
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        x = F.relu(self.mix(x))
        x = F.interpolate(x, size=(5, 5), mode="bilinear", align_corners=False)
        g_avg = F.adaptive_avg_pool2d(x, 1)
        g_max = F.adaptive_max_pool2d(x, 1)
        return torch.cat([g_avg, g_max], 1).view(x.size(0), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SigmoidAtEnd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)
        self.input_shape = (3, SIZE, SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = F.relu(self.conv(x)).mean((2, 3))
        return torch.sigmoid(self.fc(f))


def _trained_bn(model: nn.Module) -> nn.Module:
    """Gives BatchNorm layers non-trivial running statistics, then switches to eval."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, SIZE, SIZE))
    return model.eval()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny nets on a shared 2-core machine: extra intra-op threads only add contention.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def zoo() -> tuple[nn.Module, bytes, ImportedModel]:
    torch.manual_seed(0)
    model = _trained_bn(ZooNet())
    data = export_onnx(model, None)
    return model, data, load_onnx_model(data)


def _ort(data: bytes, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.numpy()})[0]


def _x(n: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- round trips


def test_round_trip_matches_torch_and_onnxruntime(zoo):
    model, data, imported = zoo
    x = _x(5)
    with torch.no_grad():
        want = model(x)
        got = imported(x)
    assert got.shape == (5, 2)
    assert (got - want).abs().max().item() < ATOL
    assert np.abs(_ort(data, x) - want.numpy()).max() < ATOL
    # F and H split where the torch model splits.
    with torch.no_grad():
        assert (imported.features(x) - model.features(x)).abs().max().item() < ATOL
    assert imported.head.weight.shape == (2, 24)
    assert torch.allclose(imported.head.weight, model.head.weight)
    assert imported.input_shape == (3, SIZE, SIZE) and imported.output_dim == 2 and imported.feature_dim == 24


def test_gradients_flow_to_input_and_weights(zoo):
    _, _, imported = zoo
    x = _x(2).requires_grad_(True)
    imported.zero_grad()
    imported(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    convs = [p for n, p in imported.named_parameters() if p.dim() == 4]
    assert convs and all(p.grad is not None and p.grad.abs().sum() > 0 for p in convs)
    assert imported.head.weight.grad is not None


def test_import_then_export_keeps_names_and_values(tmp_path: Path):
    torch.manual_seed(1)
    model = _trained_bn(ZooNet(d=3))
    data = export_onnx(model, None, input_name="face", output_name="head_pose_deg")
    imported = load_onnx_model(data)
    assert (imported.input_name, imported.output_name) == ("face", "head_pose_deg")
    path = tmp_path / "out" / "mitigated.onnx"
    again = export_onnx(imported, path)
    assert path.read_bytes() == again
    assert not list(path.parent.glob(".*.tmp"))
    g = onnx.load_model_from_string(again).graph
    assert [i.name for i in g.input] == ["face"] and [o.name for o in g.output] == ["head_pose_deg"]
    assert g.input[0].type.tensor_type.shape.dim[0].dim_param  # batch stays dynamic
    x = _x(3)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(_ort(again, x) - want).max() < ATOL
    assert (load_onnx_model(path)(x) - torch.from_numpy(want)).abs().max().item() < ATOL


def test_engine_model_round_trip():
    from drmguard_engine.models import build_model

    model = build_model("tiny", "gaze", input_size=SIZE, seed=0).eval()
    data = export_onnx(model)  # input_shape from the model
    imported = load_onnx_model(data)
    x = _x(3)
    with torch.no_grad():
        assert (imported(x) - model(x)).abs().max().item() < ATOL
        assert (imported.features(x) - model.features(x)).abs().max().item() < ATOL
    assert np.abs(_ort(data, x) - model(x).detach().numpy()).max() < ATOL


def test_imported_model_fine_tunes():
    torch.manual_seed(2)
    imported = load_onnx_model(export_onnx(_trained_bn(ZooNet()), None))
    x, y = _x(4), torch.randn(4, 2)
    imported.train()
    opt = torch.optim.SGD(imported.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.l1_loss(imported(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    imported.eval()
    # Fine-tuned weights, batch statistics included, export and run under ONNX Runtime unchanged.
    data = export_onnx(imported)
    with torch.no_grad():
        assert np.abs(_ort(data, x) - imported(x).numpy()).max() < ATOL


def test_export_rejects_old_opset_and_missing_shape():
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(SigmoidAtEnd(), None, opset=13)
    with pytest.raises(ConfigError, match="input_shape"):
        export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), None)


# ---------------------------------------------------------------------------------------------- the head


def test_sigmoid_after_final_linear_is_refused():
    data = export_onnx(SigmoidAtEnd(), None, check=False)
    with pytest.raises(UnsupportedModelError, match=r"must end in one linear layer .*found Sigmoid after it"):
        load_onnx_model(data)


def _graph_model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    *,
    out_dim: int = 2,
    in_shape: tuple = ("N", 3, 8, 8),
    opset: int = 17,
    domains: tuple[tuple[str, int], ...] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out_dim])],
        [numpy_helper.from_array(v.astype(v.dtype), k) for k, v in inits.items()],
    )
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in domains]
    return helper.make_model(graph, opset_imports=imports, ir_version=8)


def _conv_gap_inits(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float32),
        "shape": np.array([0, -1], dtype=np.int64),
    }


def _features_nodes() -> list[onnx.NodeProto]:
    # SAME_UPPER conv, a Relu, GAP, then the "Reshape to [0,-1]" flatten of other exporters.
    return [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Reshape", ["p", "shape"], ["f"]),
    ]


def _check_against_ort(model: onnx.ModelProto, imported: ImportedModel, n: int = 3) -> None:
    x = torch.rand(n, *imported.input_shape, generator=torch.Generator().manual_seed(5))
    want = _ort(model.SerializeToString(), x)
    with torch.no_grad():
        got = imported(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < ATOL


def test_matmul_add_head_is_found():
    rng = np.random.default_rng(0)
    inits = _conv_gap_inits(rng) | {
        "W": rng.standard_normal((4, 2)).astype(np.float32),
        "B": rng.standard_normal(2).astype(np.float32),
    }
    nodes = _features_nodes() + [
        helper.make_node("MatMul", ["f", "W"], ["mm"]),
        helper.make_node("Add", ["B", "mm"], ["lin"]),
        helper.make_node("Identity", ["lin"], ["y"]),
    ]
    model = _graph_model(nodes, inits)
    imported = load_onnx_model(model.SerializeToString())
    assert torch.allclose(imported.head.weight, torch.from_numpy(inits["W"].T))
    assert torch.allclose(imported.head.bias, torch.from_numpy(inits["B"]))
    _check_against_ort(model, imported)


def test_gemm_head_honours_trans_alpha_beta():
    rng = np.random.default_rng(1)
    inits = _conv_gap_inits(rng) | {
        "W": rng.standard_normal((4, 2)).astype(np.float32),  # (m, d): transB = 0
        "C": rng.standard_normal((1, 2)).astype(np.float32),
    }
    nodes = _features_nodes() + [
        helper.make_node("Transpose", ["f"], ["ft"], perm=[1, 0]),
        helper.make_node("Gemm", ["ft", "W", "C"], ["y"], alpha=0.5, beta=2.0, transA=1, transB=0),
    ]
    model = _graph_model(nodes, inits)
    imported = load_onnx_model(model.SerializeToString())
    assert torch.allclose(imported.head.weight, 0.5 * torch.from_numpy(inits["W"].T))
    assert torch.allclose(imported.head.bias, 2.0 * torch.from_numpy(inits["C"][0]))
    assert imported.features(torch.rand(3, 3, 8, 8)).shape == (3, 4)
    _check_against_ort(model, imported)


def test_shape_gather_concat_flatten_pattern_folds():
    # x.view(x.size(0), c * h * w) as exporters write it: Shape, Gather, Mul, Unsqueeze, Concat, Reshape.
    rng = np.random.default_rng(2)
    inits = {
        "w": rng.standard_normal((2, 3, 3, 3)).astype(np.float32),
        "i0": np.array(0, dtype=np.int64),
        "i1": np.array(1, dtype=np.int64),
        "i2": np.array(2, dtype=np.int64),
        "i3": np.array(3, dtype=np.int64),
        "ax0": np.array([0], dtype=np.int64),
        "W": rng.standard_normal((2, 2 * 4 * 4)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[0, 0, 1, 1], strides=[2, 2]),
        helper.make_node("MaxPool", ["c"], ["m"], kernel_shape=[2, 2], pads=[1, 1, 0, 0], strides=[1, 1]),
        helper.make_node("Shape", ["m"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["n"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["ch"], axis=0),
        helper.make_node("Gather", ["s", "i2"], ["h"], axis=0),
        helper.make_node("Gather", ["s", "i3"], ["w_"], axis=0),
        helper.make_node("Mul", ["ch", "h"], ["chh"]),
        helper.make_node("Mul", ["chh", "w_"], ["chw"]),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Unsqueeze", ["chw", "ax0"], ["k1"]),
        helper.make_node("Concat", ["n1", "k1"], ["target"], axis=0),
        helper.make_node("Reshape", ["m", "target"], ["f"]),
        helper.make_node("Gemm", ["f", "W"], ["y"], transB=1),
    ]
    model = _graph_model(nodes, inits)
    imported = load_onnx_model(model.SerializeToString())
    _check_against_ort(model, imported, n=5)
    # The folded reshape is batch-independent: re-exported, it runs at any batch size.
    _check_against_ort(onnx.load_model_from_string(export_onnx(imported)), imported, n=1)


@pytest.mark.filterwarnings("ignore")  # the legacy exporter's own deprecation and folding notes
def test_fixed_batch_torch_export_still_imports_for_any_batch(tmp_path: Path, zoo):
    model, _, _ = zoo
    path = tmp_path / "fixed.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (_x(1),), str(path), dynamo=False, opset_version=17)  # no dynamic_axes
    imported = load_onnx_model(path)
    x = _x(3)
    with torch.no_grad():
        assert (imported(x) - model(x)).abs().max().item() < ATOL


def test_fixed_batch_flatten_target_is_read_as_the_batch():
    # A fixed-batch export bakes its batch of one into the flatten's target ([1, -1]), read as the batch.
    rng = np.random.default_rng(12)
    inits = _conv_gap_inits(rng) | {"W": rng.standard_normal((2, 4)).astype(np.float32)}
    inits["shape"] = np.array([1, -1], dtype=np.int64)
    nodes = _features_nodes() + [helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    model = _graph_model(nodes, inits, in_shape=(1, 3, 8, 8))
    imported = load_onnx_model(model.SerializeToString())
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    want = np.concatenate([_ort(model.SerializeToString(), x[i:i + 1]) for i in range(5)])
    with torch.no_grad():
        assert np.abs(imported(x).numpy() - want).max() < ATOL
    _check_against_ort(onnx.load_model_from_string(export_onnx(imported)), imported, n=5)


def test_fixed_batch_export_that_cannot_be_read_gets_a_hint():
    # (1, 4) -> (4, 1) -> (1, 4): no reading of the baked 1 keeps the samples apart
    rng = np.random.default_rng(12)
    inits = _conv_gap_inits(rng) | {"W": rng.standard_normal((2, 4)).astype(np.float32),
                                    "col": np.array([4, 1], dtype=np.int64)}
    nodes = _features_nodes() + [
        helper.make_node("Reshape", ["f", "col"], ["fc"]),
        helper.make_node("Transpose", ["fc"], ["ft"], perm=[1, 0]),
        helper.make_node("Gemm", ["ft", "W"], ["y"], transB=1),
    ]
    model = _graph_model(nodes, inits, in_shape=(1, 3, 8, 8))
    with pytest.raises(
        UnsupportedModelError, match="fixed batch size of 1; .* re-export with a dynamic batch axis"
    ):
        load_onnx_model(model.SerializeToString())


def test_graph_without_linear_layer_is_refused():
    rng = np.random.default_rng(3)
    inits = _conv_gap_inits(rng)
    inits["w"] = inits["w"][:2]
    inits["b"] = inits["b"][:2]
    model = _graph_model(_features_nodes()[:-1] + [helper.make_node("Flatten", ["p"], ["y"])], inits)
    with pytest.raises(UnsupportedModelError, match="found no Gemm or MatMul"):
        load_onnx_model(model.SerializeToString())


def test_graph_that_mixes_the_batch_is_refused():
    rng = np.random.default_rng(4)
    inits = _conv_gap_inits(rng) | {"W": rng.standard_normal((2, 4)).astype(np.float32)}
    nodes = _features_nodes() + [
        helper.make_node("ReduceMean", ["f"], ["mu"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["f", "mu"], ["fc"]),
        helper.make_node("Gemm", ["fc", "W"], ["y"], transB=1),
    ]
    with pytest.raises(UnsupportedModelError, match="mixes samples of a batch"):
        load_onnx_model(_graph_model(nodes, inits).SerializeToString())


# ---------------------------------------------------------------------------------------------- the gate


def test_truncated_and_garbage_bytes_are_refused(zoo):
    _, data, _ = zoo
    for bad in (data[: len(data) // 2], b"\x00\xff garbage \x13" * 10, b""):
        with pytest.raises(UnsupportedModelError, match="not a valid ONNX model"):
            check_onnx_bytes(bad)
    with pytest.raises(UnsupportedModelError, match="limit"):
        check_onnx_bytes(data, max_bytes=1000)


def test_external_data_is_refused(zoo):
    _, data, _ = zoo
    model = onnx.load_model_from_string(data)
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    with pytest.raises(UnsupportedModelError, match="external data"):
        check_onnx_bytes(model.SerializeToString())


def test_custom_domain_op_is_refused():
    rng = np.random.default_rng(5)
    inits = _conv_gap_inits(rng) | {"W": rng.standard_normal((2, 4)).astype(np.float32)}
    nodes = _features_nodes() + [
        helper.make_node("Gemm", ["f", "W"], ["g"], transB=1),
        helper.make_node("Evil", ["g"], ["y"], domain="com.example"),
    ]
    data = _graph_model(nodes, inits, domains=(("com.example", 1),)).SerializeToString()
    with pytest.raises(UnsupportedModelError, match="domain 'com.example' is not allowed"):
        check_onnx_bytes(data)


def test_ops_outside_the_allow_list_are_refused():
    rng = np.random.default_rng(6)
    inits = _conv_gap_inits(rng) | {"W": rng.standard_normal((2, 4)).astype(np.float32)}
    nodes = _features_nodes() + [
        helper.make_node("Gemm", ["f", "W"], ["g"], transB=1),
        helper.make_node("Hardmax", ["g"], ["y"]),
    ]
    with pytest.raises(UnsupportedModelError, match="op 'Hardmax' .* not supported"):
        check_onnx_bytes(_graph_model(nodes, inits).SerializeToString())


def test_wrong_input_and_output_shapes_are_refused():
    rng = np.random.default_rng(7)
    w = {"W": rng.standard_normal((2, 8)).astype(np.float32)}
    flat = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)]
    with pytest.raises(UnsupportedModelError, match="rank 4"):
        check_onnx_bytes(_graph_model(flat, w, in_shape=("N", 8)).SerializeToString())
    inits = _conv_gap_inits(rng)
    with pytest.raises(UnsupportedModelError, match="fixed C,H,W"):
        check_onnx_bytes(
            _graph_model(_features_nodes(), inits, in_shape=("N", 3, "H", 8)).SerializeToString()
        )
    bad_out = _graph_model(_features_nodes()[:3] + [helper.make_node("Identity", ["p"], ["y"])], inits)
    bad_out.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 1, 1]))
    with pytest.raises(UnsupportedModelError, match="rank 2"):
        check_onnx_bytes(bad_out.SerializeToString())


def test_checker_failure_is_refused():
    rng = np.random.default_rng(8)
    inits = _conv_gap_inits(rng) | {"W": rng.standard_normal((2, 4)).astype(np.float32)}
    nodes = _features_nodes() + [helper.make_node("Gemm", ["f", "missing"], ["y"], transB=1)]
    with pytest.raises(UnsupportedModelError, match="not a valid ONNX model"):
        check_onnx_bytes(_graph_model(nodes, inits).SerializeToString())


def test_huge_intermediate_tensor_is_refused_before_allocation():
    rng = np.random.default_rng(9)
    inits = _conv_gap_inits(rng) | {
        "sizes": np.array([1, 4, 100_000, 100_000], dtype=np.int64),
        "W": rng.standard_normal((2, 4)).astype(np.float32),
    }
    feats = _features_nodes()
    nodes = [
        feats[0],
        helper.make_node("Resize", ["c", "", "", "sizes"], ["big"], mode="nearest"),
        helper.make_node("GlobalAveragePool", ["big"], ["p"]),
        feats[3],
        helper.make_node("Gemm", ["f", "W"], ["y"], transB=1),
    ]
    with pytest.raises(UnsupportedModelError, match="element limit"):
        load_onnx_model(_graph_model(nodes, inits).SerializeToString())


def test_huge_broadcast_is_refused_before_allocation():
    """(N,192,1) + (1,1,2^21): a few KB of input that would broadcast to 800M floats (3.2 GB) at batch 2.
    ONNX's static shape inference (``check_onnx_bytes``) usually sees it coming; the interpreter refuses it on
    its own too, before the dry run allocates it (a graph can hide shapes from static inference)."""
    from drmguard_engine.onnx_ops import interpret

    rng = np.random.default_rng(9)
    nodes = [
        helper.make_node("Reshape", ["x", "col"], ["c"]),
        helper.make_node("Add", ["c", "row"], ["big"]),
        helper.make_node("ReduceMean", ["big"], ["r"], axes=[2], keepdims=0),
        helper.make_node("Gemm", ["r", "W"], ["y"], transB=1),
    ]
    inits = {"col": _i(-1, 192, 1), "row": np.zeros((1, 1, 1 << 21), np.float32),
             "W": rng.standard_normal((2, 192)).astype(np.float32)}
    graph = _graph_model(nodes, inits).graph
    with pytest.raises(UnsupportedModelError, match="element limit"):
        interpret(graph, "x", torch.rand(2, 3, 8, 8), 17)


def test_string_initializer_is_refused():
    rng = np.random.default_rng(10)
    inits = _conv_gap_inits(rng) | {"W": rng.standard_normal((2, 4)).astype(np.float32)}
    model = _graph_model(_features_nodes() + [helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)], inits)
    model.graph.initializer.append(helper.make_tensor("junk", TensorProto.STRING, [1], [b"x"]))
    with pytest.raises(UnsupportedModelError, match="unsupported element type STRING"):
        load_onnx_model(model.SerializeToString())


def test_missing_file_is_refused(tmp_path: Path):
    with pytest.raises(UnsupportedModelError, match="cannot read"):
        load_onnx_model(tmp_path / "nope.onnx")


def test_engine_does_not_import_onnxruntime():
    code = (
        "import sys, drmguard_engine.onnx_io; assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dynamo_exporter_output_imports():
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (dev extra)")
    import warnings

    from drmguard_engine.models import build_model

    model = build_model("tiny", "gaze", input_size=SIZE, seed=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model,
            (_x(2),),
            dynamo=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            opset_version=18,
            verbose=False,
        )
    imported = load_onnx_model(prog.model_proto.SerializeToString())
    x = _x(3)
    with torch.no_grad():
        assert (imported(x) - model(x)).abs().max().item() < ATOL
        assert (imported.features(x) - model.features(x)).abs().max().item() < ATOL


# ---------------------------------------------------------------------------------------------- op coverage

_R = np.random.default_rng(11)


def _c(*shape: int) -> np.ndarray:
    return _R.standard_normal(shape).astype(np.float32)


def _i(*vals: int) -> np.ndarray:
    return np.array(vals, dtype=np.int64)


def _f(*vals: float) -> np.ndarray:
    return np.array(vals, dtype=np.float32)


# (id, opset, nodes from "x" (N,3,8,8) to "m" (rank 4, C channels), initializers, C)
_OP_CASES = [
    (
        "avgpool_asym_exclude",
        17,
        [
            helper.make_node(
                "AveragePool", ["x"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]
            )
        ],
        {},
        3,
    ),
    (
        "avgpool_include_ceil",
        17,
        [
            helper.make_node(
                "AveragePool",
                ["x"],
                ["m"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=1,
                ceil_mode=1,
            )
        ],
        {},
        3,
    ),
    (
        "maxpool_ceil_dilated",
        17,
        [
            helper.make_node(
                "MaxPool", ["x"], ["m"], kernel_shape=[2, 2], strides=[2, 2], dilations=[2, 2], ceil_mode=1
            )
        ],
        {},
        3,
    ),
    (
        "maxpool_same_lower",
        17,
        [
            helper.make_node(
                "MaxPool", ["x"], ["m"], kernel_shape=[2, 2], strides=[1, 1], auto_pad="SAME_LOWER"
            )
        ],
        {},
        3,
    ),
    (
        "depthwise_dilated",
        17,
        [helper.make_node("Conv", ["x", "w"], ["m"], group=3, dilations=[2, 2], pads=[2, 2, 2, 2])],
        {"w": _c(3, 1, 3, 3)},
        3,
    ),
    (
        "conv_transpose_asym",
        17,
        [
            helper.make_node(
                "ConvTranspose",
                ["x", "w", "b"],
                ["m"],
                strides=[2, 2],
                pads=[1, 1, 0, 0],
                output_padding=[1, 1],
            )
        ],
        {"w": _c(3, 4, 3, 3), "b": _c(4)},
        4,
    ),
    (
        "resize_nearest_half_pixel",
        17,
        [
            helper.make_node(
                "Resize",
                ["x", "", "s"],
                ["m"],
                mode="nearest",
                coordinate_transformation_mode="half_pixel",
                nearest_mode="round_prefer_floor",
            )
        ],
        {"s": _f(1, 1, 1.5, 1.5)},
        3,
    ),
    (
        "resize_nearest_down_ceil",
        17,
        [
            helper.make_node(
                "Resize",
                ["x", "", "s"],
                ["m"],
                mode="nearest",
                coordinate_transformation_mode="half_pixel",
                nearest_mode="round_prefer_ceil",
            )
        ],
        {"s": _f(1, 1, 0.5, 0.5)},
        3,
    ),
    (
        "resize_linear_align_corners_shape_sizes",
        17,
        [
            helper.make_node("Shape", ["x"], ["shp"]),
            helper.make_node("Slice", ["shp", "z", "two_i"], ["nc"]),
            helper.make_node("Concat", ["nc", "hw"], ["sz"], axis=0),
            helper.make_node(
                "Resize",
                ["x", "", "", "sz"],
                ["m"],
                mode="linear",
                coordinate_transformation_mode="align_corners",
            ),
        ],
        {"z": _i(0), "two_i": _i(2), "hw": _i(13, 11)},
        3,
    ),
    (
        "resize_linear_half_pixel_down",
        17,
        [
            helper.make_node(
                "Resize", ["x", "", "s"], ["m"], mode="linear", coordinate_transformation_mode="half_pixel"
            )
        ],
        {"s": _f(1, 1, 0.5, 0.5)},
        3,
    ),
    (
        "pad_edge",
        17,
        [helper.make_node("Pad", ["x", "pp"], ["m"], mode="edge")],
        {"pp": _i(0, 0, 1, 2, 0, 0, 2, 1)},
        3,
    ),
    (
        "pad_constant_value",
        17,
        [helper.make_node("Pad", ["x", "pp", "v"], ["m"], mode="constant")],
        {"pp": _i(0, 0, 1, 0, 0, 0, 0, 3), "v": _f(0.5).reshape(())},
        3,
    ),
    ("softmax_channels", 17, [helper.make_node("Softmax", ["x"], ["m"], axis=1)], {}, 3),
    (
        "prelu_hardsigmoid",
        17,
        [
            helper.make_node("PRelu", ["x", "sl"], ["t"]),
            helper.make_node("HardSigmoid", ["t"], ["m"], alpha=0.3, beta=0.4),
        ],
        {"sl": _c(3, 1, 1)},
        3,
    ),
    (
        "elu_erf_clip",
        17,
        [
            helper.make_node("Elu", ["x"], ["a"], alpha=0.7),
            helper.make_node("Erf", ["a"], ["b"]),
            helper.make_node("Clip", ["b", "lo", "hi"], ["m"]),
        ],
        {"lo": _f(-0.2).reshape(()), "hi": _f(0.6).reshape(())},
        3,
    ),
    ("clip_attrs_opset10", 10, [helper.make_node("Clip", ["x"], ["m"], min=0.1, max=0.7)], {}, 3),
    (
        "unsqueeze_squeeze_inputs",
        13,
        [helper.make_node("Unsqueeze", ["x", "ax"], ["u"]), helper.make_node("Squeeze", ["u", "ax"], ["m"])],
        {"ax": _i(2)},
        3,
    ),
    (
        "unsqueeze_squeeze_attrs",
        11,
        [
            helper.make_node("Unsqueeze", ["x"], ["u"], axes=[2]),
            helper.make_node("Squeeze", ["u"], ["m"], axes=[2]),
        ],
        {},
        3,
    ),
    ("gather_channels", 17, [helper.make_node("Gather", ["x", "idx"], ["m"], axis=1)], {"idx": _i(2, 0)}, 2),
    (
        "slice_steps",
        17,
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["m"])],
        {"st": _i(1, 1), "en": _i(-1, 7), "ax": _i(2, 3), "sp": _i(1, 2)},
        3,
    ),
    (
        "slice_bgr_flip",
        17,
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["m"])],
        {"st": _i(-1), "en": _i(-4), "ax": _i(1), "sp": _i(-1)},
        3,
    ),
    (
        "reduce_mean_axes_input",
        18,
        [
            helper.make_node("ReduceMean", ["x", "ax"], ["r"], keepdims=1),
            helper.make_node("Sub", ["x", "r"], ["m"]),
        ],
        {"ax": _i(2, 3)},
        3,
    ),
    (
        "reduce_max_attr",
        17,
        [
            helper.make_node("ReduceMax", ["x"], ["r"], axes=[1], keepdims=1),
            helper.make_node("Concat", ["x", "r"], ["m"], axis=1),
        ],
        {},
        4,
    ),
    (
        "transpose_concat",
        17,
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]),
            helper.make_node("Relu", ["t"], ["r"]),
            helper.make_node("Concat", ["x", "r"], ["m"], axis=1),
        ],
        {},
        6,
    ),
    (
        "arith_broadcast",
        17,
        [
            helper.make_node("Mul", ["x", "k"], ["a"]),
            helper.make_node("Pow", ["a", "two"], ["b"]),
            helper.make_node("Add", ["b", "one"], ["c"]),
            helper.make_node("Sqrt", ["c"], ["d"]),
            helper.make_node("Div", ["one", "d"], ["m"]),
        ],
        {"k": _c(1, 3, 1, 1), "two": _f(2.0).reshape(()), "one": _f(1.0).reshape(())},
        3,
    ),
    ("gelu_tanh_opset20", 20, [helper.make_node("Gelu", ["x"], ["m"], approximate="tanh")], {}, 3),
    (
        "batchnorm_hardswish",
        17,
        [
            helper.make_node("BatchNormalization", ["x", "g", "b", "mu", "var"], ["t"], epsilon=1e-3),
            helper.make_node("HardSwish", ["t"], ["m"]),
        ],
        {"g": _c(3), "b": _c(3), "mu": _c(3), "var": np.abs(_c(3)) + 0.5},
        3,
    ),
]


_OP_CASES += [
    (
        "layernorm_channels_last",
        17,
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
            helper.make_node("LayerNormalization", ["t", "g", "b"], ["n"], axis=-1, epsilon=1e-6),
            helper.make_node("Transpose", ["n"], ["m"], perm=[0, 3, 1, 2]),
        ],
        {"g": _c(3), "b": _c(3)},
        3,
    ),
    (
        "layernorm_over_chw_no_bias",
        17,
        [helper.make_node("LayerNormalization", ["x", "g"], ["m"], axis=1)],
        {"g": _c(3, 1, 8)},  # broadcast scale: not the normalised shape
        3,
    ),
    (
        "where_compare_minmax_trig",
        17,
        [
            helper.make_node("Greater", ["x", "half"], ["gt"]),
            helper.make_node("Less", ["x", "half"], ["lt"]),
            helper.make_node("Not", ["lt"], ["nlt"]),
            helper.make_node("Equal", ["gt", "nlt"], ["eq"]),
            helper.make_node("Sin", ["x"], ["s"]),
            helper.make_node("Cos", ["x"], ["c"]),
            helper.make_node("Where", ["gt", "s", "c"], ["w"]),
            helper.make_node("Where", ["eq", "w", "x"], ["w2"]),
            helper.make_node("Max", ["w2", "lo"], ["mx"]),
            helper.make_node("Min", ["mx", "hi"], ["m"]),
        ],
        {"half": _f(0.5).reshape(()), "lo": _f(0.1).reshape(()), "hi": _c(1, 3, 1, 1)},
        3,
    ),
    (
        "split_concat_mod",
        18,
        [
            helper.make_node("Split", ["x"], ["s0", "s1", "s2"], axis=1, num_outputs=3),
            helper.make_node("Mod", ["s1", "k"], ["md"], fmod=1),
            helper.make_node("Concat", ["s2", "md", "s0"], ["m"], axis=1),
        ],
        {"k": _f(0.3).reshape(())},
        3,
    ),
    (
        "split_sizes_input",
        13,
        [
            helper.make_node("Split", ["x", "sz"], ["a", "b"], axis=2),
            helper.make_node("Concat", ["b", "a"], ["m"], axis=2),
        ],
        {"sz": _i(3, 5)},
        3,
    ),
    (
        # (N*3, 8, 8): a batch x heads axis; Reshape's 0 copies it, batch multiple and all
        "reshape_zero_copies_batch_times_heads",
        17,
        [
            helper.make_node("Reshape", ["x", "s1"], ["a"]),
            helper.make_node("Reshape", ["a", "s2"], ["b"]),
            helper.make_node("Relu", ["b"], ["c"]),
            helper.make_node("Reshape", ["c", "s3"], ["m"]),
        ],
        {"s1": _i(-1, 8, 8), "s2": _i(0, 64), "s3": _i(-1, 3, 8, 8)},
        3,
    ),
    (
        "expand_static",
        17,
        [
            helper.make_node("ReduceMean", ["x"], ["r"], axes=[2, 3], keepdims=1),
            helper.make_node("Expand", ["r", "shp"], ["e"]),
            helper.make_node("Sub", ["x", "e"], ["m"]),
        ],
        {"shp": _i(1, 3, 8, 8)},
        3,
    ),
    (
        # indices of rank 2 on a channel axis: (N, 2, 2, 8, 8), merged back to 4 channels
        "gather_rank2_indices",
        17,
        [
            helper.make_node("Gather", ["x", "gi"], ["g"], axis=1),
            helper.make_node("Reshape", ["g", "gs"], ["m"]),
        ],
        {"gi": np.array([[2, 0], [1, 1]], dtype=np.int64), "gs": _i(0, 4, 8, 8)},
        4,
    ),
    (
        # Swin's window mask: Range, a ConstantOfShape and a ScatterND folded into one constant
        "range_scatternd_folded_mask",
        17,
        [
            helper.make_node("Range", ["r0", "r1", "r2"], ["rg"]),
            helper.make_node("Unsqueeze", ["rg", "ax1"], ["ri"]),
            helper.make_node("ConstantOfShape", ["ms"], ["z"],
                             value=numpy_helper.from_array(np.zeros(1, np.float32))),
            helper.make_node("ScatterND", ["z", "ri", "up"], ["mask"]),
            helper.make_node("Add", ["x", "mask"], ["m"]),
        ],
        {"r0": np.array(1, np.int64), "r1": np.array(7, np.int64), "r2": np.array(2, np.int64),
         "ax1": _i(1), "ms": _i(8, 8), "up": _c(3, 8)},
        3,
    ),
    (
        # ScatterND into the input's values on a non-batch axis (channels 0 and 2 replaced, channel 2 summed)
        "scatternd_on_input_values",
        17,
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2, 3]),
            helper.make_node("Slice", ["t", "s0", "s1", "s2"], ["u"]),
            helper.make_node("Mul", ["u", "two"], ["u2"]),
            helper.make_node("ScatterND", ["t", "si", "u2"], ["sc"], reduction="add"),
            helper.make_node("Transpose", ["sc"], ["m"], perm=[1, 0, 2, 3]),
        ],
        {"s0": _i(0), "s1": _i(2), "s2": _i(0), "two": _f(2.0), "si": np.array([[0], [2]], dtype=np.int64)},
        3,
    ),
]


@pytest.mark.parametrize("case", _OP_CASES, ids=[c[0] for c in _OP_CASES])
def test_op_matches_onnxruntime(case):
    _, opset, nodes, inits, c = case
    head = [
        helper.make_node("GlobalAveragePool", ["m"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1),
    ]
    inits = dict(inits) | {"W": _c(2, c), "B": _c(2)}
    model = _graph_model(nodes + head, inits, opset=opset)
    imported = load_onnx_model(model.SerializeToString())
    _check_against_ort(model, imported)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    imported(x).sum().backward()
    assert x.grad is not None


def _torch_export(model: nn.Module, x: torch.Tensor, *, dynamo: bool, dynamic: bool = True) -> bytes:
    """``model`` exported with one of torch's exporters; ``dynamic=False`` keeps the traced batch fixed, as
    a call without ``dynamic_axes`` / ``dynamic_shapes`` does."""
    import io
    import warnings

    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (dev extra)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
            prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"], output_names=["output"],
                                     verbose=False, dynamic_shapes=shapes)
            return prog.model_proto.SerializeToString()
        buf = io.BytesIO()
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic else None
        torch.onnx.export(model, (x,), buf, input_names=["input"], output_names=["output"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
        return buf.getvalue()


class _TokenNet(nn.Module):
    """A tiny ViT: patch embedding, a class token expanded to the batch, LayerNorm, torch's multi-head
    attention (whose exports move the batch off axis 0 and reshape to batch x heads), a GELU MLP, a linear
    head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.ln = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1)
        n = self.ln(t)
        t = t + self.attn(n, n, n, need_weights=False)[0]
        t = t + self.mlp(t)
        return self.head(t[:, 0] + t.mean(1))


class _QKVNet(nn.Module):
    """timm-style hand-written attention: one qkv projection unpacked along a leading axis (Split + Squeeze in
    the export) with the batch moved to axis 1."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        b, n, d = t.shape
        q, k, v = self.qkv(t).reshape(b, n, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.head((t + a.transpose(1, 2).reshape(b, n, d)).mean(1))


@pytest.mark.parametrize("net", [_TokenNet, _QKVNet], ids=["torch_attention", "handwritten_attention"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_vit_style_models_import(dynamo: bool, net: type[nn.Module]):
    torch.manual_seed(0)
    data = _torch_export(net().eval(), _x(2), dynamo=dynamo)
    imported = load_onnx_model(data)
    for n in (1, 5):  # the class token follows the batch size
        x = _x(n)
        assert np.abs(imported(x).detach().numpy() - _ort(data, x)).max() < ATOL
    x = _x(3).requires_grad_(True)
    imported(x).sum().backward()
    assert x.grad is not None and imported.head.weight.shape == (2, 8)
    # what mitigation writes back imports again (a traced squeeze used to export as an If node)
    again = export_onnx(imported, input_shape=(3, SIZE, SIZE))  # what mitigation writes back
    assert np.abs(_ort(again, _x(4)) - _ort(data, _x(4))).max() < ATOL
    load_onnx_model(again)


def test_channels_last_models_import_and_export_channels_last():
    """TensorFlow/Keras exports (tf2onnx) keep an (N,H,W,C) input: the module takes (N,C,H,W) like every other
    (scans and benign sets are channels-first), and the mitigated model is written back channels-last."""
    rng = np.random.default_rng(12)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "W"], ["y"], transB=1),
    ]
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "W": rng.standard_normal((2, 8)).astype(np.float32)}
    data = _graph_model(nodes, inits, in_shape=("N", 12, 10, 3)).SerializeToString()
    imported = load_onnx_model(data)
    assert imported.input_shape == (3, 12, 10) and imported.input_layout == "NHWC"
    x = torch.rand(4, 3, 12, 10)
    nhwc = x.permute(0, 2, 3, 1).contiguous()
    assert np.abs(imported(x).detach().numpy() - _ort(data, nhwc)).max() < ATOL
    imported.train(False)
    again = export_onnx(imported)
    assert not imported.training
    sess = ort.InferenceSession(again, providers=["CPUExecutionProvider"])
    assert list(sess.get_inputs()[0].shape[1:]) == [12, 10, 3]
    assert np.abs(_ort(again, nhwc) - _ort(data, nhwc)).max() < ATOL
    assert load_onnx_model(again).input_layout == "NHWC"


def test_constant_scaling_after_the_head_is_folded_into_it():
    """Unit conversions and offsets after the final linear layer (radians to degrees, a calibration offset)
    keep H one linear layer; a reciprocal (c / y) is not linear and is refused."""
    rng = np.random.default_rng(13)
    inits = _conv_gap_inits(rng) | {
        "W": rng.standard_normal((2, 4)).astype(np.float32), "B": rng.standard_normal(2).astype(np.float32),
        "deg": np.array(180 / np.pi, np.float32), "off": _f(1.5, -2.0).reshape(1, 2), "two": _f(2.0, 4.0),
    }
    nodes = _features_nodes() + [
        helper.make_node("Gemm", ["f", "W", "B"], ["g"], transB=1),
        helper.make_node("Mul", ["deg", "g"], ["t1"]),
        helper.make_node("Add", ["t1", "off"], ["t2"]),
        helper.make_node("Sub", ["off", "t2"], ["t3"]),
        helper.make_node("Div", ["t3", "two"], ["y"]),
    ]
    model = _graph_model(nodes, inits)
    imported = load_onnx_model(model.SerializeToString())
    _check_against_ort(model, imported)
    assert isinstance(imported.head, nn.Linear) and imported.head.out_features == 2
    recip = _features_nodes() + [
        helper.make_node("Gemm", ["f", "W", "B"], ["g"], transB=1),
        helper.make_node("Div", ["two", "g"], ["y"]),
    ]
    with pytest.raises(UnsupportedModelError, match="found Div after it"):
        load_onnx_model(_graph_model(recip, inits).SerializeToString())


class _ViewNet(nn.Module):
    """Flattens with ``view(x.shape[0], -1)``: a fixed-batch export folds the batch into the target."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, 2, 1), nn.Linear(4 * (SIZE // 2) ** 2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return self.fc(y.view(y.shape[0], -1))


@pytest.mark.parametrize("net", [_ViewNet, _TokenNet, _QKVNet], ids=["view_flatten", "torch_attention",
                                                                    "handwritten_attention"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_fixed_batch_exports_import_for_every_batch_size(dynamo: bool, batch: int, net: type[nn.Module]):
    """An export without a dynamic batch axis (torch's default) bakes its batch size into Reshape targets and
    the class token; the import reads them as the batch, and matches ONNX Runtime run at the file's batch."""
    torch.manual_seed(0)
    data = _torch_export(net().eval(), _x(batch), dynamo=dynamo, dynamic=False)
    assert onnx.load_model_from_string(data).graph.input[0].type.tensor_type.shape.dim[0].dim_value == batch
    imported = load_onnx_model(data)
    x = _x(6)
    want = np.concatenate([_ort(data, x[i:i + batch]) for i in range(0, 6, batch)])
    with torch.no_grad():
        assert np.abs(imported(x).numpy() - want).max() < ATOL
        assert np.abs(imported(x[:1]).numpy() - want[:1]).max() < ATOL
    again = export_onnx(imported)  # the mitigation's re-export has a dynamic batch axis
    assert np.abs(_ort(again, x) - want).max() < ATOL


class _ConvClassifier(nn.Module):
    """A convolutional classifier: global pooling, then a 1x1 Conv to the outputs, then a flatten, a squeeze
    or a view (SqueezeNet- and MobileNetV3-style heads)."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.AdaptiveAvgPool2d(1))
        self.h = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.h(self.f(x))
        if self.tail == "squeeze":
            return y.squeeze(-1).squeeze(-1)
        return y.view(x.shape[0], -1) if self.tail == "view" else y.flatten(1)


@pytest.mark.parametrize("tail", ["flatten", "squeeze", "view"])
def test_a_1x1_conv_head_on_pooled_features_is_the_linear_head(tail: str):
    torch.manual_seed(0)
    model = _trained_bn(_ConvClassifier(tail)).eval()
    data = _torch_export(model, _x(2), dynamo=False)
    imported = load_onnx_model(data)
    assert (imported.feature_dim, imported.output_dim) == (8, 2)
    x = _x(5)
    with torch.no_grad():
        f = imported.features(x)
        assert f.shape == (5, 8)
        assert np.abs(imported.head(f).numpy() - _ort(data, x)).max() < ATOL
    assert np.abs(_ort(export_onnx(imported), x) - _ort(data, x)).max() < ATOL


@pytest.mark.parametrize("pool", ["GlobalAveragePool", "ReduceMean", "ReduceMean18"])
def test_a_1x1_conv_that_global_pooling_follows_is_the_linear_head(pool: str):
    # mean(conv1x1(m)) == conv1x1(mean(m)): F is the (N,8,16,16) map pooled, H the Conv
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "h": rng.standard_normal((2, 8, 1, 1)).astype(np.float32),
             "hb": rng.standard_normal(2).astype(np.float32)}
    if pool == "ReduceMean18":
        inits["ax"] = np.array([2, 3], dtype=np.int64)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "h", "hb"], ["o"])]
    if pool == "GlobalAveragePool":
        nodes += [helper.make_node(pool, ["o"], ["p"]), helper.make_node("Flatten", ["p"], ["y"])]
    elif pool == "ReduceMean":
        nodes += [helper.make_node(pool, ["o"], ["y"], axes=[2, 3], keepdims=0)]
    else:
        nodes += [helper.make_node("ReduceMean", ["o", "ax"], ["y"], keepdims=0)]
    model = _graph_model(nodes, inits, opset=18 if pool == "ReduceMean18" else 17)
    imported = load_onnx_model(model.SerializeToString())
    assert (imported.feature_form, imported.feature_dim, imported.output_dim) == ("pool", 8, 2)
    assert torch.allclose(imported.head.weight, torch.from_numpy(inits["h"].reshape(2, 8)))
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert imported.features(x).shape == (5, 8)
    _check_against_ort(model, imported, n=5)
    assert np.abs(_ort(export_onnx(imported), x) - _ort(model.SerializeToString(), x)).max() < ATOL


def test_a_relu_between_a_1x1_conv_head_and_the_pooling_is_refused_with_the_reason():
    # SqueezeNet's classifier (Conv 1x1, ReLU, global pooling) is not one linear layer
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "h": rng.standard_normal((2, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["c", "h"], ["o"]),
             helper.make_node("Relu", ["o"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["y"], axes=[2, 3], keepdims=0)]
    model = _graph_model(nodes, inits)
    with pytest.raises(UnsupportedModelError, match="Relu, ReduceMean after the last 1x1 Conv"):
        load_onnx_model(model.SerializeToString())


def test_a_1x1_conv_head_with_a_stride_over_a_map_is_not_a_linear_head():
    # a strided 1x1 Conv drops pixels before the pooling: not the mean of the whole map
    rng = np.random.default_rng(4)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             "h": rng.standard_normal((2, 8, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["c", "h"], ["o"], strides=[2, 2]),
             helper.make_node("ReduceMean", ["o"], ["y"], axes=[2, 3], keepdims=0)]
    with pytest.raises(UnsupportedModelError, match="must end in one linear layer"):
        load_onnx_model(_graph_model(nodes, inits).SerializeToString())


def _fixed_batch_graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray],
                       batch: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("batch", [1, 2])
def test_fixed_batch_flat_gather_of_each_sample_runs_at_any_batch(batch: int):
    # the dynamo exporter's as_strided (torchvision's ConvNeXt head): pooled (B,4,1,1) features flattened to
    # 1-D and gathered with baked flat indices, sample b's at 4b..4b+3
    rng = np.random.default_rng(6)
    idx = (np.arange(batch).reshape(-1, 1) * 4 + np.array([2, 0, 3, 1])).reshape(batch, 4, 1, 1)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "flat": _i(-1),
             "idx": idx.astype(np.int64), "W": rng.standard_normal((2, 4)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Reshape", ["p", "flat"], ["v"]),
             helper.make_node("Gather", ["v", "idx"], ["g"], axis=0),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    model = _fixed_batch_graph(nodes, inits, batch)
    data = model.SerializeToString()
    imported = load_onnx_model(data)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    want = np.concatenate([_ort(data, x[i:i + batch]) for i in range(0, 6, batch)])
    with torch.no_grad():
        assert np.abs(imported(x).numpy() - want).max() < ATOL
    assert np.abs(_ort(export_onnx(imported), x) - want).max() < ATOL


def test_fixed_batch_gather_that_mixes_samples_is_refused():
    # sample 1 reads sample 0's entries: the graph really mixes the batch
    rng = np.random.default_rng(6)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "flat": _i(-1),
             "idx": np.array([0, 1, 2, 3, 0, 1, 2, 3], dtype=np.int64).reshape(2, 4),
             "W": rng.standard_normal((2, 4)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Reshape", ["p", "flat"], ["v"]),
             helper.make_node("Gather", ["v", "idx"], ["f"], axis=0),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    with pytest.raises(UnsupportedModelError, match="each sample picks the same entries"):
        load_onnx_model(_fixed_batch_graph(nodes, inits, 2).SerializeToString())


class _Mid(nn.Module):
    """conv -> an op under test -> global mean -> linear head."""

    def __init__(self, mid: nn.Module) -> None:
        super().__init__()
        self.c, self.mid, self.h = nn.Conv2d(3, 8, 3, 2, 1), mid, nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.mid(self.c(x)).mean((2, 3)))


class _Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,cd->ndhw", x, self.w)


class _PixelShuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(torch.cat([x, x.flip(1), -x, x * 2], 1), 2)


class _L2Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.h = nn.Conv2d(3, 8, 3, 2, 1), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(F.normalize(self.c(x).mean((2, 3)), dim=1))


_MORE_OPS = {
    "groupnorm": lambda: _Mid(nn.GroupNorm(2, 8)),
    "instancenorm": lambda: _Mid(nn.InstanceNorm2d(8, affine=True)),
    "mish": lambda: _Mid(nn.Mish()),
    "selu": lambda: _Mid(nn.SELU()),
    "celu": lambda: _Mid(nn.CELU(0.5)),
    "einsum": lambda: _Mid(_Einsum()),
    "pixel_shuffle": lambda: _Mid(_PixelShuffle()),
    "l2_normalize": _L2Head,
}


@pytest.mark.parametrize("name", sorted(_MORE_OPS))
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_more_ops_of_registry_models_import_and_reexport(dynamo: bool, name: str):
    """GroupNorm/InstanceNorm (InstanceNormalization), Mish, SELU, CELU, Einsum with a weight, PixelShuffle
    (DepthToSpace) and an L2-normalised feature (ReduceL2): each matches ONNX Runtime, trains (the norm scales
    and the einsum weight are parameters) and survives the mitigation's re-export."""
    torch.manual_seed(0)
    model = _MORE_OPS[name]().eval()
    data = _torch_export(model, _x(2), dynamo=dynamo)
    imported = load_onnx_model(data)
    x = _x(5)
    want = _ort(data, x)
    with torch.no_grad():
        assert np.abs(imported(x).numpy() - want).max() < ATOL
    assert np.abs(_ort(export_onnx(imported), x) - want).max() < ATOL
    if name in ("groupnorm", "instancenorm", "einsum"):
        n_params = sum(p.numel() for p in imported.body.parameters())
        assert n_params > sum(p.numel() for p in model.c.parameters())  # the op's own weights are trainable


@pytest.mark.parametrize(("op", "mode"),
                         [("DepthToSpace", "DCR"), ("DepthToSpace", "CRD"), ("SpaceToDepth", None)])
def test_depth_space_ops_match_onnx_runtime(op: str, mode: str | None):
    rng = np.random.default_rng(7)
    inits = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
             # 8x8 input: DepthToSpace gives (N,2,16,16), SpaceToDepth (N,32,4,4); all reach the head
             "W": rng.standard_normal((2, 512)).astype(np.float32)}
    attrs = {"blocksize": 2} | ({"mode": mode} if mode else {})
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node(op, ["r"], ["d"], **attrs),
             helper.make_node("Flatten", ["d"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    model = _graph_model(nodes, inits)
    imported = load_onnx_model(model.SerializeToString())
    _check_against_ort(model, imported, n=4)


@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceProd"])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_more_reductions_match_onnx_runtime(op: str, keepdims: int):
    rng = np.random.default_rng(9)
    inits = {"w": (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32),
             "W": rng.standard_normal((2, 16)).astype(np.float32), "shape": np.array([0, -1], dtype=np.int64)}
    # over W (4 values): ReduceProd of 4 sigmoids stays far above ATOL, so a wrong reduction shows
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Sigmoid", ["c"], ["r"]),
             helper.make_node(op, ["r"], ["p"], axes=[3], keepdims=keepdims),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "W"], ["y"], transB=1)]
    model = _graph_model(nodes, inits, opset=17)
    _check_against_ort(model, load_onnx_model(model.SerializeToString()), n=4)
