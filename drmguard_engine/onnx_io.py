"""ONNX in and out: export engine models, gate submitted files, import them as differentiable modules.

* :func:`export_onnx` writes a model as ONNX (legacy TorchScript exporter, opset >= 17, float32 NCHW input
  in [0, 1], dynamic batch axis), for engine models and for the modules :func:`load_onnx_model` returns.
* :func:`check_onnx_bytes` is the hostile-input gate: it parses and validates without executing anything
  (no external data, standard domains only, the interpreter's op allow-list, one (N,C,H,W) float input and
  one (N,d) output, ``onnx.checker`` full check and strict shape inference).
* :func:`load_onnx_model` interprets an accepted graph into an :class:`ImportedModel`, an ``nn.Module`` split
  into F (``features``) and H (``head``, an ``nn.Linear`` built from the final Gemm or MatMul+Add), so the
  scan can read the penultimate features and the mitigation can fine-tune the weights.

Why an interpreter of our own rather than onnx2torch: see ``docs/onnx-import.md``.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from google.protobuf.message import DecodeError
from torch import nn

from .errors import ConfigError, UnsupportedModelError
from .onnx_ops import ALLOWED_OPS, DRY_BATCH, MAX_ELEMENTS, Const, Dyn, GraphBody, Interpreted, interpret

#: Largest ONNX file accepted (a ResNet-34 regression model is about 85 MB).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: Most nodes in a graph (ResNet-34 has about 120 after export).
MAX_NODES = 20_000
#: Input caps: channels, spatial side, and the elements of one image.
MAX_CHANNELS = 16
MAX_SIDE = 4096
MAX_IMAGE_ELEMENTS = 16 * 1024 * 1024
#: Oldest default-domain opset read (earlier ones use attribute forms the interpreter does not read).
MIN_OPSET = 9
MIN_EXPORT_OPSET = 17

_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_TAIL_OPS = ("Identity", "Reshape", "Flatten", "Squeeze", "Dropout", "Cast")


# ----------------------------------------------------------------------------------------------------------
# Export


def _atomic_write(path: Path, data: bytes) -> None:
    """Writes then renames, so a reader never sees a half-written model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    opset: int = 17,
    check: bool = True,
) -> bytes:
    """Exports ``model`` as ONNX bytes (and writes them atomically to ``path`` when given).

    The graph takes float32 NCHW images in [0, 1] (normalisation lives inside the model) with a dynamic batch
    axis named ``batch`` and returns (N, d). The legacy TorchScript exporter is used (``dynamo=False``): it
    needs no onnxscript and traces both engine models and :class:`ImportedModel`.

    Args:
        model: an ``nn.Module`` mapping (N,C,H,W) to (N,d); left in the train/eval mode it came in.
        path: where to write the file; ``None`` only returns the bytes.
        input_shape: (C, H, W); defaults to ``model.input_shape``.
        input_name: graph input name; defaults to ``model.input_name`` (an imported model keeps the submitted
            name) or ``"input"``.
        output_name: graph output name; defaults to ``model.output_name`` or ``"output"``.
        opset: ONNX opset, at least 17.
        check: run :func:`check_onnx_bytes` on the result, so that what we write we can also read back.

    Returns:
        The serialised ONNX model.

    Raises:
        ConfigError: opset below 17, no input shape, or clashing tensor names.
        UnsupportedModelError: the exported graph fails our own gate (``check=True``).
    """
    if int(opset) < MIN_EXPORT_OPSET:
        raise ConfigError(f"opset must be >= {MIN_EXPORT_OPSET}, got {opset}")
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None or len(tuple(shape)) != 3 or any(int(s) <= 0 for s in shape):
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {shape!r}")
    c, h, w = (int(s) for s in shape)
    channels_last = getattr(model, "input_layout", "NCHW") == "NHWC"
    in_name = input_name or getattr(model, "input_name", None) or "input"
    out_name = output_name or getattr(model, "output_name", None) or "output"
    if in_name == out_name:
        raise ConfigError(f"input and output names must differ, both are {in_name!r}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    # Batch 2, not 1: the tracer must not specialise anything on a batch of one.
    gen = torch.Generator().manual_seed(0)
    dummy = torch.rand(2, c, h, w, generator=gen).to(device)
    if channels_last:  # an imported channels-last model keeps its submitted (N,H,W,C) interface
        model, dummy = _ChannelsLast(model).train(model.training), dummy.permute(0, 2, 3, 1).contiguous()
    buf = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # The legacy exporter warns about its own deprecation and tracer details; the engine never prints.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                buf,
                input_names=[in_name],
                output_names=[out_name],
                dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}},
                opset_version=int(opset),
                dynamo=False,
                do_constant_folding=True,
                export_params=True,
            )
    finally:
        model.train(was_training)
    data = buf.getvalue()
    if check:
        check_onnx_bytes(data)
    if path is not None:
        _atomic_write(Path(path), data)
    return data


class _ChannelsLast(nn.Module):
    """Takes (N,H,W,C) and runs a module that takes (N,C,H,W) (for exporting channels-last models)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------------------------------------
# The gate


def _dims(t: onnx.TypeProto) -> list[int | str | None] | None:
    """Dims of a tensor type: int when fixed, the symbol name (or None) when not; None for an unknown rank."""
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _check_tensor_storage(t: onnx.TensorProto, where: str) -> None:
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0:
        raise UnsupportedModelError(
            f"{where} {t.name!r} refers to external data: submit a single self-contained .onnx file "
            "(onnx.save_model(model, path, save_as_external_data=False))"
        )


def _model_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # Before IR 4 exporters listed initializers as graph inputs too; those are weights, not inputs.
    inits = {i.name for i in graph.initializer}
    return [i for i in graph.input if i.name not in inits]


def default_opset(model: onnx.ModelProto) -> int:
    """The ``ai.onnx`` opset version the model imports (0 when it imports none)."""
    return max((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def check_onnx_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> onnx.ModelProto:
    """Parses and validates an untrusted ONNX file without executing anything from it.

    Args:
        data: the file's bytes.
        max_bytes: size cap; larger files are refused before parsing.

    Returns:
        The parsed model (unchanged).

    Raises:
        UnsupportedModelError: not ONNX, too large, external data, non-standard domain, an op outside the
            interpreter's allow-list, model-local functions, or inputs/outputs of the wrong shape.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise UnsupportedModelError(f"expected the ONNX file's bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise UnsupportedModelError(f"the ONNX file is {len(data)} bytes, over the {max_bytes}-byte limit")
    if not data:
        raise UnsupportedModelError("not a valid ONNX model: the file is empty")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise UnsupportedModelError(f"not a valid ONNX model: {e or 'protobuf decode error'}") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.graph.node:
        raise UnsupportedModelError("not a valid ONNX model: no graph, no nodes or no IR version")

    for imp in model.opset_import:
        if imp.domain not in _STANDARD_DOMAINS:
            raise UnsupportedModelError(
                f"operator domain {imp.domain!r} is not allowed: "
                "only the standard ai.onnx and ai.onnx.ml domains are read"
            )
    opset = default_opset(model)
    if opset < MIN_OPSET:
        raise UnsupportedModelError(
            f"ai.onnx opset {opset} is too old: re-export with opset >= 17 (at least {MIN_OPSET})"
        )
    if len(model.functions) > 0:
        raise UnsupportedModelError("model-local functions are not supported: export with functions inlined")

    graph = model.graph
    if len(graph.node) > MAX_NODES:
        raise UnsupportedModelError(f"the graph has {len(graph.node)} nodes, over the limit of {MAX_NODES}")
    if len(graph.sparse_initializer) > 0:
        raise UnsupportedModelError("sparse initializers are not supported: store weights as dense tensors")
    for init in graph.initializer:
        _check_tensor_storage(init, "initializer")
    for node in graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            raise UnsupportedModelError(
                f"node {node.name!r} uses op {node.op_type!r} from the custom domain {node.domain!r}: "
                "only standard ONNX ops are accepted"
            )
        if node.domain == "ai.onnx.ml" or node.op_type not in ALLOWED_OPS:
            raise UnsupportedModelError(
                f"op {node.op_type!r} (node {node.name!r}) is not supported by the importer; supported ops: "
                f"{', '.join(sorted(ALLOWED_OPS))}"
            )
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise UnsupportedModelError(f"node {node.name!r} carries a sub-graph, which is not supported")
            if a.type == onnx.AttributeProto.TENSOR:
                _check_tensor_storage(a.t, f"constant of node {node.name!r}")
            if a.type == onnx.AttributeProto.TENSORS:
                for t in a.tensors:
                    _check_tensor_storage(t, f"constant of node {node.name!r}")

    inputs = _model_inputs(graph)
    if len(inputs) != 1:
        raise UnsupportedModelError(f"the model must have exactly one input (N,C,H,W), it has {len(inputs)}")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(f"input {inp.name!r} must be float32 images in [0,1]")
    dims = _dims(inp.type)
    if dims is None or len(dims) != 4:
        raise UnsupportedModelError(f"input {inp.name!r} must have rank 4 (N,C,H,W), got shape {dims}")
    chw = dims[1:]
    if not all(isinstance(d, int) and d > 0 for d in chw):
        raise UnsupportedModelError(
            f"input {inp.name!r} must have fixed C,H,W (only the batch may be symbolic), got {dims}"
        )
    c, h, w = _chw(dims)
    if c > MAX_CHANNELS or h > MAX_SIDE or w > MAX_SIDE or c * h * w > MAX_IMAGE_ELEMENTS:
        raise UnsupportedModelError(
            f"input shape {dims} is over the limits (C <= {MAX_CHANNELS}, H,W <= {MAX_SIDE})"
        )
    if len(graph.output) != 1:
        raise UnsupportedModelError(
            f"the model must have exactly one output (N,d), it has {len(graph.output)}"
        )
    out = graph.output[0]
    if out.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError(f"output {out.name!r} must be float32")

    try:
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"not a valid ONNX model: {first[:500]}") from None
    # Shape inference knows most intermediate sizes: refuse giant tensors before anything is allocated.
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        vdims = _dims(vi.type) or []
        if math.prod(d for d in vdims if isinstance(d, int) and d > 0) > MAX_ELEMENTS:
            raise UnsupportedModelError(
                f"tensor {vi.name!r} of shape {vdims} is over the {MAX_ELEMENTS}-element limit"
            )
    out_dims = _dims(out.type) or _dims(inferred.graph.output[0].type)
    if out_dims is not None and len(out_dims) != 2:
        raise UnsupportedModelError(f"output {out.name!r} must have rank 2 (N,d), got shape {out_dims}")
    return model


# ----------------------------------------------------------------------------------------------------------
# Import


#: Channel counts an image input can have; a rank-4 input whose last axis is one of these and whose axis 1 is
#: not is read as channels-last (TensorFlow/Keras exports through tf2onnx keep NHWC).
_IMAGE_CHANNELS = (1, 3, 4)


def input_layout(dims: Sequence[int | str | None]) -> str:
    """``"NHWC"`` for a channels-last image input (N,H,W,C), else ``"NCHW"``."""
    if (len(dims) == 4 and isinstance(dims[3], int) and dims[3] in _IMAGE_CHANNELS
            and isinstance(dims[1], int) and dims[1] not in _IMAGE_CHANNELS):
        return "NHWC"
    return "NCHW"


def _chw(dims: Sequence[int | str | None]) -> tuple[int, int, int]:
    """(C, H, W) of a rank-4 image input in either layout."""
    if input_layout(dims) == "NHWC":
        return int(dims[3]), int(dims[1]), int(dims[2])  # type: ignore[arg-type]
    return int(dims[1]), int(dims[2]), int(dims[3])  # type: ignore[arg-type]


class ImportedModel(nn.Module):
    """An ONNX regression model as a differentiable module, ``forward(x) == head(features(x))``.

    Attributes:
        body: the interpreted graph up to the input of the final linear layer.
        head: H, the final linear layer (``nn.Linear(m, d)``).
        input_name, output_name: the submitted graph's tensor names (``export_onnx`` reuses them).
        input_shape: (C, H, W).
        input_layout: ``"NCHW"``, or ``"NHWC"`` for a channels-last graph: the module still takes (N,C,H,W)
            (scans and benign sets are channels-first) and permutes before the graph; ``export_onnx`` writes
            the submitted channels-last interface back.
        opset: the submitted default-domain opset.
    """

    def __init__(
        self,
        body: GraphBody,
        head: nn.Linear,
        *,
        feature_form: str = "",
        input_name: str,
        output_name: str,
        input_shape: tuple[int, int, int],
        opset: int,
        producer: str = "",
        input_layout: str = "NCHW",
    ) -> None:
        super().__init__()
        if input_layout not in ("NCHW", "NHWC"):
            raise ConfigError(f"input_layout must be NCHW or NHWC, got {input_layout!r}")
        self.input_layout = input_layout
        self.body = body
        self.head = head
        if feature_form not in _FEATURE_FORMS:
            raise ConfigError(f"feature_form must be one of {sorted(_FEATURE_FORMS)}, got {feature_form!r}")
        self.feature_form = feature_form
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.opset = int(opset)
        self.producer = producer

    @property
    def output_dim(self) -> int:
        """d, the number of regression outputs."""
        return int(self.head.out_features)

    @property
    def feature_dim(self) -> int:
        """m, the width of the penultimate feature."""
        return int(self.head.in_features)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """F: (N,C,H,W) images in [0,1] -> (N,m) penultimate features."""
        f = self.body(x.permute(0, 2, 3, 1) if self.input_layout == "NHWC" else x)
        # Gemm with transA=1 multiplies an (m,N) matrix; F is defined as its (N,m) transpose. A 1x1 Conv head
        # reads (N,m,1,1) pooled features; one followed by global average pooling reads the (N,m,h,w) map,
        # and since both are linear, F is that map pooled first.
        if self.feature_form == "flatten":
            return f.flatten(1)
        if self.feature_form == "pool":
            return f.mean((2, 3))
        return f.t() if self.feature_form == "transpose" else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f = H(F(x)): (N,C,H,W) -> (N,d)."""
        return self.head(self.features(x))

    def describe(self) -> dict[str, object]:
        """JSON-able summary for reports."""
        return {
            "source": "onnx",
            "producer": self.producer,
            "opset": self.opset,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "input_shape": list(self.input_shape),
            "input_layout": self.input_layout,
            "feature_dim": self.feature_dim,
            "output_dim": self.output_dim,
            "steps": len(self.body.steps),
        }


def _read_source(source: str | os.PathLike[str] | bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        try:
            size = p.stat().st_size
            if size > max_bytes:
                raise UnsupportedModelError(f"{p}: {size} bytes, over the {max_bytes}-byte limit")
            return p.read_bytes()
        except OSError as e:
            raise UnsupportedModelError(f"cannot read the ONNX file {str(p)!r}: {e.strerror or e}") from None
    raise UnsupportedModelError(f"expected a path or the ONNX file's bytes, got {type(source).__name__}")


_LINEAR_MSG = ("the model must end in one linear layer (Gemm, MatMul+Add, or a 1x1 Conv on pooled features "
               "or followed by global average pooling) producing the outputs")
#: How F reads the final linear layer's input: as it is (N,m), transposed (Gemm transA), flattened
#: ((N,m,1,1) under a 1x1 Conv) or pooled ((N,m,h,w) under a 1x1 Conv that global average pooling follows).
_FEATURE_FORMS = frozenset({"", "transpose", "flatten", "pool"})


def _dyn_input(interp: Interpreted, node: onnx.NodeProto) -> str | None:
    """The first input of ``node`` that depends on the model input."""
    for name in node.input:
        if name and isinstance(interp.values.get(name), Dyn):
            return name
    return None


def _const(interp: Interpreted, name: str) -> torch.Tensor | None:
    v = interp.values.get(name) if name else None
    if isinstance(v, Const) and isinstance(v.value, torch.Tensor) and v.value.is_floating_point():
        return v.value
    return None


#: Element-wise ops by a constant that may follow the final linear layer (unit conversions such as radians to
#: degrees, offsets, output scaling); they are folded into H, which stays one linear layer.
_AFFINE_OPS = ("Mul", "Div", "Add", "Sub")


def _affine_operand(interp: Interpreted, node: onnx.NodeProto) -> tuple[str, torch.Tensor, bool, str] | None:
    """(op, constant, input-is-first, input name) when ``node`` is (N,d) op constant with a constant that
    broadcasts along d, or constant op (N,d) for Mul, Add and Sub; else None."""
    if len(node.input) != 2 or not all(node.input):
        return None
    a, b = node.input
    dyn_first = isinstance(interp.values.get(a), Dyn)
    dyn, other = (a, b) if dyn_first else (b, a)
    c = _const(interp, other)
    v = interp.values.get(dyn)
    if c is None or not isinstance(v, Dyn) or v.example.dim() != 2 or v.batch_axis != 0:
        return None
    if c.dim() > 2 or (c.dim() == 2 and c.shape[0] != 1):
        return None
    if not dyn_first and node.op_type == "Div":
        return None  # c / y is not linear in y
    return node.op_type, c.reshape(-1), dyn_first, dyn


def _fold_affine(weight: torch.Tensor, bias: torch.Tensor, affine: list[tuple[str, torch.Tensor, bool]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """H after the element-wise constant ops ``affine`` (listed from the output backwards)."""
    d = weight.shape[0]
    for op, c, dyn_first in reversed(affine):
        if c.numel() not in (1, d):
            raise UnsupportedModelError(
                f"{_LINEAR_MSG}; a {op} after it has {c.numel()} values for {d} outputs")
        c = c.expand(d) if c.numel() == 1 else c
        if op == "Mul":
            weight, bias = weight * c[:, None], bias * c
        elif op == "Div":
            weight, bias = weight / c[:, None], bias / c
        elif op == "Add":
            bias = bias + c
        elif dyn_first:  # y - c
            bias = bias - c
        else:  # c - y
            weight, bias = -weight, c - bias
    return weight, bias


def _bias(c: torch.Tensor | None, d: int, scale: float, where: str) -> torch.Tensor:
    if c is None:
        return torch.zeros(d)
    if (
        c.numel() not in (1, d)
        or (c.dim() >= 1 and c.shape[-1] not in (1, d))
        or any(s != 1 for s in c.shape[:-1])
    ):
        raise UnsupportedModelError(
            f"{_LINEAR_MSG}; the bias of {where} has shape {list(c.shape)}, expected ({d},)"
        )
    return (c.reshape(-1) * scale).expand(d).clone()


def _global_mean_input(interp: Interpreted, node: onnx.NodeProto) -> str | None:
    """The input of ``node`` when it is a global average pool of a rank-4 map (GlobalAveragePool, or a
    ReduceMean over axes 2 and 3 in the attribute or the opset-18 input form), else ``None``."""
    if not node.input or not isinstance(interp.values.get(node.input[0]), Dyn):
        return None
    if interp.values[node.input[0]].example.dim() != 4:  # type: ignore[union-attr]
        return None
    if node.op_type == "GlobalAveragePool":
        return node.input[0]
    if node.op_type != "ReduceMean":
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axes = attrs.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        c = interp.values.get(node.input[1])
        if isinstance(c, Const) and isinstance(c.value, torch.Tensor) and not c.value.is_floating_point():
            axes = [int(v) for v in c.value.reshape(-1).tolist()]
    return node.input[0] if axes is not None and sorted(a % 4 for a in axes) == [2, 3] else None


def _find_head(interp: Interpreted, output_name: str) -> tuple[str, nn.Linear, str]:
    """Walks back from the output to the final linear layer: (its input name, H, how F reads that input).

    The last is "" for an (N,m) input, "transpose" for Gemm's transA=1 (an (m,N) input), "flatten" for a
    1x1 Conv on (N,m,1,1) pooled features (a convolutional classifier) and "pool" for a 1x1 Conv on an
    (N,m,h,w) map that global average pooling follows."""
    values, producers = interp.values, interp.producers
    name = output_name
    if not isinstance(values.get(name), Dyn):
        raise UnsupportedModelError("the output does not depend on the input")
    tail: list[str] = []
    affine: list[tuple[str, torch.Tensor, bool]] = []
    while True:
        node = producers[name]
        if node.op_type in _TAIL_OPS:
            nxt = _dyn_input(interp, node)
        elif node.op_type in _AFFINE_OPS and (found := _affine_operand(interp, node)) is not None:
            op, c, dyn_first, nxt = found
            behind = producers[nxt].op_type if nxt in producers else ""
            if behind and behind not in ("Gemm", "MatMul", *_TAIL_OPS, *_AFFINE_OPS):
                break  # not (yet) behind a linear layer: leave it for the error message
            affine.append((op, c, dyn_first))
        else:
            break
        if nxt is None or nxt not in producers:
            break
        tail.append(node.op_type)
        name = nxt
    node = producers[name]
    out_shape = tuple(values[output_name].example.shape)  # type: ignore[union-attr]

    def linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
        weight, bias = _fold_affine(weight, bias, affine)
        d, m = weight.shape
        if (DRY_BATCH, d) != out_shape:
            raise UnsupportedModelError(
                f"{_LINEAR_MSG}; the linear layer gives ({DRY_BATCH},{d}) at batch {DRY_BATCH} "
                "but the output "
                f"is {list(out_shape)} after {', '.join(tail)}"
            )
        lin = nn.Linear(int(m), int(d))
        with torch.no_grad():
            lin.weight.copy_(weight)
            lin.bias.copy_(bias)
        return lin

    def check_a(a: str, trans: bool) -> None:
        shape = tuple(values[a].example.shape)  # type: ignore[union-attr]
        if len(shape) != 2 or shape[1 if trans else 0] != DRY_BATCH:
            raise UnsupportedModelError(
                f"{_LINEAR_MSG}; its input must be (N,m), got {list(shape)} at batch {DRY_BATCH}"
            )

    if node.op_type == "Gemm" and isinstance(values.get(node.input[0]), Dyn):
        b = _const(interp, node.input[1])
        if b is not None and b.dim() == 2:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
            ta, tb = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
            weight = (b if tb else b.t()) * alpha
            c = _const(interp, node.input[2]) if len(node.input) > 2 else None
            if len(node.input) > 2 and node.input[2] and c is None:
                raise UnsupportedModelError(f"{_LINEAR_MSG}; the Gemm bias must be a constant")
            check_a(node.input[0], ta)
            return node.input[0], linear(weight, _bias(c, weight.shape[0], beta, "the Gemm")), \
                "transpose" if ta else ""
    # MatMul + Add: the Add (a constant bias) was folded on the way back, like any constant op after H
    matmul = node if node.op_type == "MatMul" else None
    if matmul is not None and isinstance(values.get(matmul.input[0]), Dyn):
        b = _const(interp, matmul.input[1])
        if b is not None and b.dim() == 2:
            check_a(matmul.input[0], False)
            weight = b.t()
            return matmul.input[0], linear(weight, torch.zeros(weight.shape[0])), ""
    # A convolutional classifier: a 1x1 Conv over (N,m,1,1) pooled features is a linear layer on them, and so
    # is one over an (N,m,h,w) map that global average pooling follows (pooling and the Conv commute).
    form = "flatten"
    pooled = _global_mean_input(interp, node)
    if pooled is not None and pooled in producers and producers[pooled].op_type == "Conv":
        node, form = producers[pooled], "pool"
    if node.op_type == "Conv" and isinstance(values.get(node.input[0]), Dyn):
        w = _const(interp, node.input[1])
        a_shape = tuple(values[node.input[0]].example.shape)  # type: ignore[union-attr]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if form == "pool":
            fits = len(a_shape) == 4 and not any(s != 1 for s in attrs.get("strides", []))
        else:
            fits = a_shape == (DRY_BATCH, w.shape[1] if w is not None and w.dim() > 1 else -1, 1, 1)
        if (w is not None and w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) and fits
                and int(attrs.get("group", 1)) == 1 and not any(attrs.get("pads", []))
                and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET", b"VALID", "VALID")):
            c = _const(interp, node.input[2]) if len(node.input) > 2 else None
            if len(node.input) > 2 and node.input[2] and c is None:
                raise UnsupportedModelError(f"{_LINEAR_MSG}; the Conv bias must be a constant")
            weight = w.reshape(w.shape[0], w.shape[1])
            return node.input[0], linear(weight, _bias(c, weight.shape[0], 1.0, "the Conv")), form

    # Not a linear layer: say what stands between the last linear layer and the output.
    after = [node.op_type]
    cur = node
    while True:
        nxt = _dyn_input(interp, cur)
        if nxt is None or nxt not in producers:
            raise UnsupportedModelError(
                f"{_LINEAR_MSG}; found no Gemm or MatMul before the output (it comes from {node.op_type})"
            )
        cur = producers[nxt]
        if cur.op_type in ("Gemm", "MatMul"):
            ops = list(reversed(after))
            raise UnsupportedModelError(f"{_LINEAR_MSG}; found {', '.join(ops)} after it")
        w = _const(interp, cur.input[1]) if cur.op_type == "Conv" and len(cur.input) > 1 else None
        if w is not None and w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) and w.shape[0] == out_shape[-1]:
            ops = list(reversed(after))
            raise UnsupportedModelError(
                f"{_LINEAR_MSG}; found {', '.join(ops)} after the last 1x1 Conv (a classifier like "
                "SqueezeNet's), which makes the head non-linear: end the model in pooling, then one linear "
                "layer"
            )
        after.append(cur.op_type)


def load_onnx_model(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> ImportedModel:
    """Imports an ONNX regression model (after :func:`check_onnx_bytes`) as an :class:`ImportedModel`.

    The module is returned in eval mode; its Conv/BatchNorm/Gemm/MatMul weights are parameters.

    Args:
        source: a path to a .onnx file or its bytes.
        max_bytes: size cap passed to the gate.

    Raises:
        UnsupportedModelError: the file fails the gate, uses an unsupported form of an op, does not end in
            one linear layer, or does not treat batch samples independently.
    """
    data = _read_source(source, max_bytes)
    model = check_onnx_bytes(data, max_bytes=max_bytes)
    graph = model.graph
    inp = _model_inputs(graph)[0]
    dims = _dims(inp.type)
    layout = input_layout(dims)  # type: ignore[arg-type]
    c, h, w = _chw(dims)  # type: ignore[arg-type]
    output_name = graph.output[0].name
    opset = default_opset(model)
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(DRY_BATCH, c, h, w, generator=gen)
    graph_example = example.permute(0, 2, 3, 1).contiguous() if layout == "NHWC" else example
    batch_dim = _dims(inp.type)[0]  # type: ignore[index]
    fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    try:
        interp = interpret(graph, inp.name, graph_example, opset, fixed_batch=fixed_batch)
    except UnsupportedModelError as e:
        raise _fixed_batch_hint(e, fixed_batch) from None
    a_name, head, feature_form = _find_head(interp, output_name)
    # F keeps only the steps the head's input depends on (dead branches and the head itself drop out).
    needed: set[str] = set()
    stack = [a_name]
    while stack:
        name = stack.pop()
        if name in needed or name == inp.name:
            continue
        needed.add(name)
        stack.extend(interp.steps[name].dyn_inputs.values())
    steps = [s for name, s in interp.steps.items() if name in needed]
    body = GraphBody(steps, inp.name, a_name)
    imported = ImportedModel(
        body,
        head,
        feature_form=feature_form,
        input_name=inp.name,
        output_name=output_name,
        input_shape=(c, h, w),
        opset=opset,
        producer=f"{model.producer_name} {model.producer_version}".strip(),
        input_layout=layout,
    )
    imported.eval()
    try:
        _self_check(imported, interp.values[output_name].example, example,  # type: ignore[union-attr]
                    fixed_batch if fixed_batch else 1)
    except UnsupportedModelError as e:
        raise _fixed_batch_hint(e, fixed_batch) from None
    return imported


def _fixed_batch_hint(e: UnsupportedModelError, fixed_batch: int | None) -> UnsupportedModelError:
    """A fixed-batch export bakes its batch into constants; a failed dry run may come from one not read as the
    batch, so say what to try."""
    if not fixed_batch:
        return e
    return UnsupportedModelError(
        f"{e} (the input has a fixed batch size of {fixed_batch}; if this comes from that size baked into "
        "the graph, re-export with a dynamic batch axis, "
        "e.g. dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})"
    )


def _self_check(
    model: ImportedModel, expected: torch.Tensor, example: torch.Tensor, fixed_batch: int = 1
) -> None:
    """Checks F/H reproduce the dry run, and that samples of a batch do not mix (batch on axis 0).

    For a graph whose file fixes the batch size, every chunk of that size must give what the graph itself
    gives at that size (there the batch-symbolic rewrite of its constants is the identity)."""
    gen = torch.Generator().manual_seed(1)
    x3 = torch.rand(3 * fixed_batch, *model.input_shape, generator=gen)
    try:
        with torch.no_grad():
            y = model(example)
            y3 = model(x3)
            y1 = torch.cat([model(x3[i:i + fixed_batch]) for i in range(0, len(x3), fixed_batch)])
    except RuntimeError as e:
        raise UnsupportedModelError(
            f"the imported graph does not run at other batch sizes (the batch must stay on axis 0): {e}"
        ) from None
    scale = 1.0 + float(expected.abs().max())
    if y.shape != expected.shape or not torch.allclose(y, expected, atol=1e-4 * scale, rtol=1e-4):
        raise UnsupportedModelError("the graph after the final linear layer changes its values")
    if y3.shape != (len(x3), model.output_dim) or not torch.allclose(y3, y1, atol=1e-4 * scale, rtol=1e-3):
        raise UnsupportedModelError(
            "the imported graph mixes samples of a batch "
            "(the batch must stay on axis 0, and no op may reduce over it)"
        )


__all__ = ["DEFAULT_MAX_BYTES", "ImportedModel", "check_onnx_bytes", "export_onnx", "load_onnx_model"]
