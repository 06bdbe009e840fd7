"""A small ONNX interpreter: turns an accepted ONNX graph into differentiable PyTorch steps.

Used by :mod:`drmguard_engine.onnx_io`; nothing here parses bytes or checks policy (``check_onnx_bytes``
does that first). The interpreter reads each node once, at import time, with a dry run at batch size
:data:`DRY_BATCH`:

* a node whose inputs are all known at import time (initializers, ``Constant``, shape arithmetic) is
  constant-folded and leaves no trace in the module;
* ``Shape`` of a tensor that depends on the input yields :class:`SymInts`, a shape whose batch entry is
  symbolic (:data:`BATCH`), so exporters' ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` flatten
  patterns fold into a static ``reshape(-1, m)`` that works for every batch size;
* every other node becomes a :class:`Step`: a module with its constant operands bound as parameters
  (weights of Conv, ConvTranspose, BatchNormalization scale/bias, Gemm, MatMul, PRelu: these are fine-tuned
  by the mitigation) or buffers (everything else: running statistics, normalisation constants), and a pure
  torch function of its inputs. Static attributes (pads, strides, reshape targets) are resolved to Python
  values at import so that tracing the module (``export_onnx``) gives a clean graph.

Only the op set in :data:`ALLOWED_OPS` is read; nothing from the file is ever executed as code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from .errors import UnsupportedModelError

#: Batch size of the import-time dry run. 2, not 1: a graph that hard-codes batch 1 fails at import.
DRY_BATCH = 2
#: Largest tensor (elements, at the dry-run batch) an op may create: a hostile file cannot make the import
#: allocate more than about 1 GiB for one value through huge Resize sizes, pads or ConstantOfShape.
MAX_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class _Batch:
    """The symbolic batch size inside a :class:`SymInts` shape, times a constant ``k``
    (attention blocks reshape to ``batch * heads``)."""

    k: int = 1

    def __repr__(self) -> str:
        return "N" if self.k == 1 else f"{self.k}N"


BATCH = _Batch(1)


def is_batch(v: Any) -> bool:
    """Whether a shape entry is the symbolic batch size (times a constant)."""
    return isinstance(v, _Batch)


@dataclass(frozen=True)
class SymInts:
    """An integer shape value known at import time except for entries equal to :data:`BATCH`."""

    values: tuple[Any, ...]
    scalar: bool = False


@dataclass
class Const:
    """A value known at import time: a tensor, or a shape with a symbolic batch entry."""

    value: torch.Tensor | SymInts


@dataclass
class Dyn:
    """A value that depends on the model input; ``example`` is its value in the dry run.

    ``batch_axis`` is the axis that grows with the batch (found by a second dry run at another batch size;
    ``None`` when none does): axis 0 for convolutional features, another one inside attention blocks that move
    the batch."""

    example: torch.Tensor
    batch_axis: int | None = 0
    #: the batch axis holds ``batch_k`` x the batch size (attention reshapes to batch x heads);
    #: 0 when its size is not a multiple of the batch (then its Shape is refused)
    batch_k: int = 1


Value = Const | Dyn

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
_INT_TYPES = {
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


_WIDE_INTS = {onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def _fail(node: onnx.NodeProto, what: str) -> UnsupportedModelError:
    label = f"{node.op_type} node {node.name!r}" if node.name else f"{node.op_type} node"
    return UnsupportedModelError(f"{label}: {what}")


def tensor_from_proto(t: onnx.TensorProto) -> torch.Tensor:
    """An initializer or Constant value as a torch tensor (float types become float32)."""
    if t.data_type not in _FLOAT_TYPES and t.data_type not in _INT_TYPES and t.data_type not in _WIDE_INTS:
        name = (
            onnx.TensorProto.DataType.Name(t.data_type)
            if t.data_type in onnx.TensorProto.DataType.values()
            else t.data_type
        )
        raise UnsupportedModelError(f"tensor {t.name!r} has the unsupported element type {name}")
    try:
        arr = numpy_helper.to_array(t)
        if t.data_type in _FLOAT_TYPES:
            arr = arr.astype(np.float32)
        elif t.data_type in _WIDE_INTS:
            arr = arr.astype(np.int64)
        # copy: numpy_helper may return a read-only view of the protobuf bytes.
        return torch.from_numpy(np.array(arr, copy=True))
    except (TypeError, ValueError) as e:
        raise UnsupportedModelError(f"tensor {t.name!r} cannot be read: {e}") from None


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise _fail(node, "sub-graph attributes are not supported")
        if a.type == onnx.AttributeProto.TENSOR:
            out[a.name] = tensor_from_proto(a.t)
        elif a.type == onnx.AttributeProto.SPARSE_TENSOR:
            raise _fail(node, "sparse tensor attributes are not supported")
        else:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode("utf-8", errors="replace")
            out[a.name] = v
    return out


class Ctx:
    """What an op preparer sees: the node, its attributes, its input values, and binding helpers."""

    def __init__(self, node: onnx.NodeProto, ins: list[Value | None], opset: int,
                 fixed_batch: int | None = None) -> None:
        self.node = node
        self.attrs = _attrs(node)
        self.ins = ins
        self.opset = opset
        #: the graph input's batch size when the file fixes it (an export without a dynamic batch axis); its
        #: constants may then hold that size where a dynamic export computes the batch (Reshape targets, class
        #: tokens), and the preparers read those entries as the batch
        self.fixed_batch = fixed_batch
        # slot -> (trainable, tensor): constants the step keeps for run time.
        self.kept: dict[int, tuple[bool, torch.Tensor]] = {}

    def fail(self, what: str) -> UnsupportedModelError:
        return _fail(self.node, what)

    def batch_axis(self, i: int) -> int | None:
        """The batch axis of input i, ``None`` for constants and batch-independent values."""
        v = self.ins[i] if i < len(self.ins) else None
        return v.batch_axis if isinstance(v, Dyn) else None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def has(self, i: int) -> bool:
        return i < len(self.ins) and self.ins[i] is not None

    def is_const(self, i: int) -> bool:
        return self.has(i) and isinstance(self.ins[i], Const)

    def shape(self, i: int) -> tuple[int, ...]:
        """Static shape of input i (the dry-run shape for input-dependent values)."""
        v = self.ins[i]
        if isinstance(v, Dyn):
            return tuple(v.example.shape)
        assert v is not None
        if isinstance(v.value, SymInts):
            return () if v.value.scalar else (len(v.value.values),)
        return tuple(v.value.shape)

    def const(self, i: int, what: str) -> torch.Tensor:
        """Input i as a tensor known at import time, or a clear refusal."""
        v = self.ins[i] if i < len(self.ins) else None
        if not isinstance(v, Const) or isinstance(v.value, SymInts):
            raise self.fail(f"{what} (input {i}) must be a constant initializer, not computed from the input")
        return v.value

    def ints(self, i: int, what: str) -> list[Any]:
        """Input i as a list of ints (``BATCH`` entries allowed)."""
        v = self.ins[i] if i < len(self.ins) else None
        if isinstance(v, Const) and isinstance(v.value, SymInts):
            return list(v.value.values)
        t = self.const(i, what)
        if t.is_floating_point():
            raise self.fail(f"{what} (input {i}) must be an integer tensor")
        return [int(x) for x in t.reshape(-1).tolist()]

    def static_ints(self, i: int, what: str) -> list[int]:
        vals = self.ints(i, what)
        if any(is_batch(v) for v in vals):
            raise self.fail(f"{what} depends on the batch size, which is not supported here")
        return vals

    def check_size(self, shape: Sequence[int]) -> None:
        """Refuses an output larger than :data:`MAX_ELEMENTS` before it is allocated."""
        if any(int(d) < 0 for d in shape) or math.prod(int(d) for d in shape) > MAX_ELEMENTS:
            raise self.fail(
                f"would create a tensor of shape {list(shape)}, over the {MAX_ELEMENTS}-element limit"
            )

    def keep(self, i: int, *, trainable: bool) -> None:
        """Binds constant input i into the step (as a parameter if trainable, else a buffer)."""
        if self.is_const(i):
            self.kept[i] = (trainable, self.const(i, "operand"))


Fn = Callable[["Step", list[Any]], torch.Tensor]
_MIN_ARGS = 7  # more than any op's optional inputs
#: The argument slot that carries the graph input to a step whose shape holds the symbolic batch size.
_BATCH_SLOT = 6


class Step(nn.Module):
    """One interpreted node: ``fn(step, args)`` with args gathered from the environment and kept constants."""

    def __init__(
        self,
        op_type: str,
        fn: Fn,
        n_inputs: int,
        dyn_inputs: dict[int, str],
        kept: dict[int, tuple[bool, torch.Tensor]],
        output: str,
    ) -> None:
        super().__init__()
        self.op_type = op_type
        self.fn = fn
        self.n_inputs = n_inputs
        self.dyn_inputs = dict(dyn_inputs)
        self.output = output
        self.const_slots: dict[int, str] = {}
        for slot, (trainable, tensor) in kept.items():
            name = f"c{slot}"
            if trainable and tensor.is_floating_point():
                self.register_parameter(name, nn.Parameter(tensor.detach().clone().float()))
            else:
                self.register_buffer(name, tensor.detach().clone())
            self.const_slots[slot] = name

    def forward(self, env: dict[str, torch.Tensor]) -> torch.Tensor:
        # Padded with None so that functions may read optional inputs the node left out.
        args: list[Any] = [None] * max(self.n_inputs, _MIN_ARGS)
        for slot, name in self.dyn_inputs.items():
            args[slot] = env[name]
        for slot, name in self.const_slots.items():
            args[slot] = getattr(self, name)
        return self.fn(self, args)

    def extra_repr(self) -> str:
        return f"{self.op_type} -> {self.output!r}"


class GraphBody(nn.Module):
    """Runs a list of :class:`Step` in order from the input tensor to ``output``."""

    def __init__(self, steps: Sequence[Step], input_name: str, output: str) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.input_name = input_name
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, torch.Tensor] = {self.input_name: x}
        for step in self.steps:
            env[step.output] = step(env)
        return env[self.output]


# ----------------------------------------------------------------------------------------------------------
# Op preparers: ``prep(ctx) -> fn``. They resolve attributes to Python values, call ``ctx.keep`` for the
# constant operands the function reads at run time, and return ``fn(step, args)``. The same function is used
# to fold nodes whose inputs are all constant (then every arg is a constant tensor).


def _pairs(ctx: Ctx, name: str, default: int, n: int = 2) -> list[int]:
    v = ctx.attr(name)
    if v is None:
        return [default] * n
    v = [int(x) for x in v]
    if len(v) != n:
        raise ctx.fail(f"{name}={v} must have {n} entries (only 2-D spatial ops are supported)")
    return v


def _same_pads(
    in_hw: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int], upper: bool
) -> list[int]:
    begins, ends = [], []
    for size, kk, ss, dd in zip(in_hw, k, s, d, strict=True):
        out = -(-size // ss)
        total = max((out - 1) * ss + (kk - 1) * dd + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if upper else big)
        ends.append(big if upper else small)
    return begins + ends


def _spatial_pads(ctx: Ctx, k: list[int], s: list[int], d: list[int]) -> list[int]:
    """ONNX pads [top, left, bottom, right], with auto_pad resolved against the static input size."""
    auto = ctx.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(ctx.shape(0)[2:], k, s, d, upper=auto == "SAME_UPPER")
    if auto == "VALID":
        return [0, 0, 0, 0]
    if auto != "NOTSET":
        raise ctx.fail(f"auto_pad={auto!r} is not supported")
    return _pairs(ctx, "pads", 0, 4)


def _need_rank4(ctx: Ctx) -> None:
    if len(ctx.shape(0)) != 4:
        raise ctx.fail(f"only 2-D (N,C,H,W) inputs are supported, got shape {list(ctx.shape(0))}")


def prep_conv(ctx: Ctx) -> Fn:
    _need_rank4(ctx)
    w = ctx.const(1, "the Conv weight")
    if w.dim() != 4:
        raise ctx.fail("only 2-D convolutions are supported")
    k = [int(x) for x in w.shape[2:]]
    s, d = _pairs(ctx, "strides", 1), _pairs(ctx, "dilations", 1)
    groups = int(ctx.attr("group", 1))
    pads = _spatial_pads(ctx, k, s, d)
    ctx.keep(1, trainable=True)
    ctx.keep(2, trainable=True)
    symmetric = pads[0] == pads[2] and pads[1] == pads[3]

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x = a[0]
        if symmetric:
            return F.conv2d(x, a[1], a[2], s, (pads[0], pads[1]), d, groups)
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
        return F.conv2d(x, a[1], a[2], s, 0, d, groups)

    return fn


def prep_conv_transpose(ctx: Ctx) -> Fn:
    _need_rank4(ctx)
    w = ctx.const(1, "the ConvTranspose weight")
    if w.dim() != 4:
        raise ctx.fail("only 2-D transposed convolutions are supported")
    k = [int(x) for x in w.shape[2:]]
    s, d = _pairs(ctx, "strides", 1), _pairs(ctx, "dilations", 1)
    groups = int(ctx.attr("group", 1))
    op = _pairs(ctx, "output_padding", 0)
    in_hw = ctx.shape(0)[2:]
    full = [
        (i - 1) * ss + (kk - 1) * dd + 1 + oo for i, ss, kk, dd, oo in zip(in_hw, s, k, d, op, strict=True)
    ]
    auto = ctx.attr("auto_pad", "NOTSET")
    if ctx.attr("output_shape") is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [int(x) for x in ctx.attr("output_shape", [])][-2:] or [
            i * ss for i, ss in zip(in_hw, s, strict=True)
        ]
        totals = [f - t for f, t in zip(full, target, strict=True)]
        if any(t < 0 for t in totals):
            raise ctx.fail("output_shape larger than the transposed convolution produces is not supported")
        upper = auto != "SAME_LOWER"
        pads = [t // 2 if upper else t - t // 2 for t in totals] + [
            t - t // 2 if upper else t // 2 for t in totals
        ]
    elif auto in ("NOTSET", "VALID"):
        pads = _pairs(ctx, "pads", 0, 4) if auto == "NOTSET" else [0, 0, 0, 0]
    else:
        raise ctx.fail(f"auto_pad={auto!r} is not supported")
    ctx.check_size([ctx.shape(0)[0], int(w.shape[1]) * groups, *full])
    ctx.keep(1, trainable=True)
    ctx.keep(2, trainable=True)
    hw_out = [full[0] - pads[0] - pads[2], full[1] - pads[1] - pads[3]]

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        y = F.conv_transpose2d(a[0], a[1], a[2], s, 0, op, groups, d)
        # ONNX pads may be asymmetric; crop them off the full output (static sizes).
        return y[:, :, pads[0] : pads[0] + hw_out[0], pads[1] : pads[1] + hw_out[1]]

    return fn


def prep_batchnorm(ctx: Ctx) -> Fn:
    for i, what in enumerate(("scale", "bias", "mean", "var"), start=1):
        ctx.const(i, f"the BatchNormalization {what}")
    if len([o for o in ctx.node.output if o]) > 1:
        raise ctx.fail("training-mode BatchNormalization (extra outputs) is not supported")
    eps = float(ctx.attr("epsilon", 1e-5))
    # ONNX momentum weighs the old running value; torch's weighs the new batch statistic.
    momentum = 1.0 - float(ctx.attr("momentum", 0.9))
    ctx.keep(1, trainable=True)
    ctx.keep(2, trainable=True)
    ctx.keep(3, trainable=False)
    ctx.keep(4, trainable=False)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        return F.batch_norm(a[0], a[3], a[4], a[1], a[2], step.training, momentum, eps)

    return fn


def _check_broadcast(ctx: Ctx, slots: Sequence[int]) -> None:
    """Refuses a broadcast whose result would be over :data:`MAX_ELEMENTS` before the dry run allocates it
    (a hostile file can broadcast a long row against a long column)."""
    try:
        shape = torch.broadcast_shapes(*[ctx.shape(i) for i in slots if ctx.has(i)])
    except RuntimeError as e:
        raise ctx.fail(f"inputs do not broadcast: {e}") from None
    ctx.check_size(shape)


def _binary(
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    int_op: Callable[..., torch.Tensor] | None = None,
):
    def prep(ctx: Ctx) -> Fn:
        _check_broadcast(ctx, (0, 1))
        ctx.keep(0, trainable=False)
        ctx.keep(1, trainable=False)

        def fn(step: Step, a: list[Any]) -> torch.Tensor:
            x, y = a[0], a[1]
            if int_op is not None and not x.is_floating_point() and not y.is_floating_point():
                return int_op(x, y)
            return op(x, y)

        return fn

    return prep


def _unary(op: Callable[[torch.Tensor], torch.Tensor]):
    def prep(ctx: Ctx) -> Fn:
        return lambda step, a: op(a[0])

    return prep


def prep_identity(ctx: Ctx) -> Fn:
    return lambda step, a: a[0]


def prep_leaky_relu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 0.01))
    return lambda step, a: F.leaky_relu(a[0], alpha)


def prep_elu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda step, a: F.elu(a[0], alpha)


def prep_selu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875))
    return lambda step, a: gamma * F.elu(a[0], alpha)  # ELU(x, alpha) is x for x > 0, alpha (e^x - 1) below


def prep_celu(ctx: Ctx) -> Fn:
    alpha = float(ctx.attr("alpha", 1.0))
    return lambda step, a: F.celu(a[0], alpha)


def prep_instance_norm(ctx: Ctx) -> Fn:
    """InstanceNormalization (GroupNorm and InstanceNorm exports): per sample and channel over the other axes;
    scale and bias are fine-tuned."""
    if len(ctx.shape(0)) < 3:
        raise ctx.fail("InstanceNormalization needs an (N, C, ...) input")
    ctx.const(1, "the InstanceNormalization scale")
    ctx.const(2, "the InstanceNormalization bias")
    eps = float(ctx.attr("epsilon", 1e-5))
    ctx.keep(1, trainable=True)
    ctx.keep(2, trainable=True)
    return lambda step, a: F.instance_norm(a[0], weight=a[1], bias=a[2], eps=eps)


def _depth_space(to_space: bool):
    def prep(ctx: Ctx) -> Fn:
        shape = ctx.shape(0)
        if len(shape) != 4 or ctx.batch_axis(0) not in (0, None):
            raise ctx.fail("needs an (N, C, H, W) input with the batch on axis 0")
        b = int(ctx.attr("blocksize"))
        mode = str(ctx.attr("mode", "DCR"))
        _, c, h, w = (int(d) for d in shape)
        fits = c % (b * b) == 0 if to_space else h % b == 0 and w % b == 0
        if b < 1 or mode not in ("DCR", "CRD") or not fits:
            raise ctx.fail(f"blocksize {b}, mode {mode!r} does not fit the input {list(shape)}")
        if to_space:
            if mode == "CRD":
                return lambda step, a: F.pixel_shuffle(a[0], b)
            cb = c // (b * b)
            return lambda step, a: (a[0].reshape(-1, b, b, cb, h, w).permute(0, 3, 4, 1, 5, 2)
                                    .reshape(-1, cb, h * b, w * b))
        return lambda step, a: (a[0].reshape(-1, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
                                .reshape(-1, c * b * b, h // b, w // b))
    return prep


def prep_einsum(ctx: Ctx) -> Fn:
    """Einsum with its equation resolved at import; constant operands (weights) are fine-tuned."""
    eq = str(ctx.attr("equation", "")).replace(" ", "")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,->.")
    if not eq or len(eq) > 64 or not set(eq) <= allowed:
        raise ctx.fail(f"equation {eq!r} is not supported")
    n = len(ctx.ins)
    try:
        out = torch.einsum(eq, *[torch.empty(ctx.shape(i), device="meta") for i in range(n)]).shape
    except RuntimeError as e:
        raise ctx.fail(f"equation {eq!r} does not fit its inputs: {e}") from None
    ctx.check_size(out)
    for i in range(n):  # a float constant is a weight; an integer one stays what it is
        ctx.keep(i, trainable=ctx.is_const(i) and ctx.const(i, "Einsum operand").is_floating_point())
    return lambda step, a: torch.einsum(eq, *[a[i] for i in range(n)])


def prep_hard_sigmoid(ctx: Ctx) -> Fn:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    return lambda step, a: torch.clamp(a[0] * alpha + beta, 0.0, 1.0)


def prep_hard_swish(ctx: Ctx) -> Fn:
    return lambda step, a: F.hardswish(a[0])


def prep_gelu(ctx: Ctx) -> Fn:
    approximate = str(ctx.attr("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise ctx.fail(f"approximate={approximate!r} is not supported")
    return lambda step, a: F.gelu(a[0], approximate=approximate)


def prep_prelu(ctx: Ctx) -> Fn:
    ctx.keep(1, trainable=True)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x, slope = a[0], a[1]
        return torch.where(x >= 0, x, x * slope)

    return fn


def prep_clip(ctx: Ctx) -> Fn:
    lo: float | None
    hi: float | None
    if ctx.opset < 11:
        lo, hi = ctx.attr("min"), ctx.attr("max")
    else:
        lo = float(ctx.const(1, "Clip min").reshape(-1)[0]) if ctx.has(1) else None
        hi = float(ctx.const(2, "Clip max").reshape(-1)[0]) if ctx.has(2) else None
    if lo is None and hi is None:
        return lambda step, a: a[0]
    return lambda step, a: torch.clamp(a[0], lo, hi)


def prep_pow(ctx: Ctx) -> Fn:
    if not ctx.is_const(1) or ctx.const(1, "Pow exponent").numel() != 1:
        raise ctx.fail("Pow needs a constant scalar exponent")
    e = float(ctx.const(1, "Pow exponent").reshape(-1)[0])
    return lambda step, a: torch.pow(a[0], e)


def prep_softmax(ctx: Ctx) -> Fn:
    rank = len(ctx.shape(0))
    if ctx.opset >= 13:
        axis = int(ctx.attr("axis", -1)) % rank
        return lambda step, a: torch.softmax(a[0], axis)
    axis = int(ctx.attr("axis", 1)) % rank
    if axis == rank - 1:
        return lambda step, a: torch.softmax(a[0], -1)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        # Opset < 13 softmax normalises over all axes from `axis` on.
        x = a[0]
        return torch.softmax(x.flatten(axis), -1).reshape(x.shape)

    return fn


def _pool_config(ctx: Ctx) -> tuple[list[int], list[int], list[int], list[int], bool]:
    _need_rank4(ctx)
    k = _pairs(ctx, "kernel_shape", 1)
    s, d = _pairs(ctx, "strides", 1), _pairs(ctx, "dilations", 1)
    pads = _spatial_pads(ctx, k, s, d)
    return k, s, d, pads, bool(ctx.attr("ceil_mode", 0))


def _torch_pads_ok(k: list[int], d: list[int], pads: list[int]) -> bool:
    # torch pools take symmetric padding of at most half the (dilated) kernel.
    if pads[0] != pads[2] or pads[1] != pads[3]:
        return False
    return all(p <= ((kk - 1) * dd + 1) // 2 for p, kk, dd in zip(pads[:2], k, d, strict=True))


def prep_maxpool(ctx: Ctx) -> Fn:
    if len(ctx.node.output) > 1 and ctx.node.output[1]:
        raise ctx.fail("the Indices output of MaxPool is not supported")
    k, s, d, pads, ceil = _pool_config(ctx)
    if _torch_pads_ok(k, d, pads):
        return lambda step, a: F.max_pool2d(a[0], k, s, (pads[0], pads[1]), d, ceil)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x = F.pad(a[0], (pads[1], pads[3], pads[0], pads[2]), value=float("-inf"))
        return F.max_pool2d(x, k, s, 0, d, ceil)

    return fn


def prep_avgpool(ctx: Ctx) -> Fn:
    k, s, d, pads, ceil = _pool_config(ctx)
    if d != [1, 1]:
        raise ctx.fail("dilated AveragePool is not supported")
    include = bool(ctx.attr("count_include_pad", 0))
    if _torch_pads_ok(k, d, pads):
        return lambda step, a: F.avg_pool2d(a[0], k, s, (pads[0], pads[1]), ceil, include)
    torch_pad = (pads[1], pads[3], pads[0], pads[2])

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x = a[0]
        total = F.avg_pool2d(F.pad(x, torch_pad), k, s, 0, ceil, True)
        if include:
            return total
        # Divide by the share of real (unpadded) pixels in each window.
        ones = F.pad(torch.ones_like(x[:1, :1]), torch_pad)
        return total / F.avg_pool2d(ones, k, s, 0, ceil, True)

    return fn


def prep_global_avg(ctx: Ctx) -> Fn:
    dims = tuple(range(2, len(ctx.shape(0))))
    return lambda step, a: a[0].mean(dim=dims, keepdim=True)


def prep_global_max(ctx: Ctx) -> Fn:
    dims = tuple(range(2, len(ctx.shape(0))))
    return lambda step, a: a[0].amax(dim=dims, keepdim=True)


def _reduce(kind: str):
    def prep(ctx: Ctx) -> Fn:
        rank = len(ctx.shape(0))
        axes: list[int] | None
        if ctx.attr("axes") is not None:
            axes = [int(x) for x in ctx.attr("axes")]
        elif ctx.has(1):
            axes = ctx.static_ints(1, f"{kind} axes")
        else:
            axes = None
        if not axes:
            if int(ctx.attr("noop_with_empty_axes", 0)):
                return lambda step, a: a[0]
            axes = list(range(rank))
        dims = tuple(sorted(a % rank for a in axes))
        keep = bool(ctx.attr("keepdims", 1))

        reducer = _REDUCERS[kind]
        return lambda step, a: reducer(a[0], dims, keep)

    return prep


def _prod(x: torch.Tensor, dims: tuple[int, ...], keep: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):  # highest axis first, so the lower ones keep their index
        x = x.prod(dim=d, keepdim=keep)
    return x


#: ReduceX -> f(x, dims, keepdim), chosen once at import
_REDUCERS: dict[str, Callable[[torch.Tensor, tuple[int, ...], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k).sqrt(),
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k),
    "ReduceProd": _prod,
}


def prep_flatten(ctx: Ctx) -> Fn:
    rank = len(ctx.shape(0))
    axis = int(ctx.attr("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if axis == 0:
        return lambda step, a: a[0].reshape(1, -1)
    if axis >= rank:
        return lambda step, a: a[0].flatten(0, rank - 1).unsqueeze(1) if rank > 0 else a[0].reshape(1, 1)
    if axis == 1:
        return lambda step, a: a[0].flatten(1)
    return lambda step, a: a[0].flatten(axis).flatten(0, axis - 1)


def _fixed_batch_axis(fb: int, k: int, in_shape: list[int], b: int, target: list[int]) -> list[Any] | None:
    """A fixed-batch export's Reshape target with the batch made symbolic, or ``None`` when none fits.

    Such an export bakes its batch size ``fb`` into the target where a dynamic export computes it ([1, -1]
    for a flatten, [L, 1 * heads, d] in attention). The input holds ``k`` x the batch on axis ``b``; in
    memory that is the block from ``outer`` = prod(in[:b]) to ``outer * fb * k`` in cumulative products. The
    target, resolved at batch ``fb``, gets the batch on the output axis that holds that block, tried in this
    order:

    * an axis of its own (size ``fb``) inside the block: a flatten, or (L * N, E) -> (L, N, E);
    * the end of an axis that starts at or before the block, when the axes after the batch are kept or merged:
      (L, N, E) -> (L * N, E);
    * the start of an axis, when the axis after the batch is split: (L, N, E) -> (L, N * heads, E / heads).

    With ``fb`` = 1 several readings fit the shapes; the self-check of the import refuses a wrong one.
    """
    at_fixed = [*in_shape[:b], fb * k, *in_shape[b + 1:]]
    try:
        out = list(torch.empty(at_fixed, device="meta").reshape(target).shape)
    except RuntimeError:
        return None
    outer = math.prod(at_fixed[:b])
    hi = outer * fb * k
    cum = [math.prod(out[:j]) for j in range(len(out) + 1)]

    def with_batch(j: int, kk: int) -> list[Any]:
        return [*out[:j], _Batch(kk), *out[j + 1:]]

    for j, d in enumerate(out):
        if d == fb and cum[j] % outer == 0 and k % (cum[j] // outer) == 0:
            return with_batch(j, 1)
    # sizes the axes after the batch take when they are kept or merged, not split
    merged = {math.prod(in_shape[b + 1:b + 1 + m]) for m in range(1, len(in_shape) - b)}
    for j, d in enumerate(out):
        split_after = j + 1 < len(out) and out[j + 1] not in merged
        if cum[j + 1] == hi and outer % cum[j] == 0 and d % fb == 0 and not split_after:
            return with_batch(j, d // fb)
    for j, d in enumerate(out):
        kk = d // fb
        if cum[j] == outer and d % fb == 0 and kk and (kk % k == 0 or k % kk == 0):
            return with_batch(j, kk)
    return None


def _reshape_target(ctx: Ctx) -> list[int]:
    """The Reshape target as torch.reshape arguments, batch-independent where the batch is symbolic."""
    in_shape = ctx.shape(0)
    target = ctx.ints(1, "the Reshape shape")
    allowzero = bool(ctx.attr("allowzero", 0))
    dyn = isinstance(ctx.ins[0], Dyn)
    resolved: list[Any] = []
    for i, t in enumerate(target):
        if not is_batch(t) and t == 0 and not allowzero:
            if i >= len(in_shape):
                raise ctx.fail("Reshape copies a dimension (0) that the input does not have")
            if dyn and i == ctx.batch_axis(0):
                k = ctx.ins[0].batch_k  # type: ignore[union-attr]
                if not k:
                    raise ctx.fail("Reshape copies (0) an axis that is not a multiple of the batch size")
                resolved.append(_Batch(k))
            else:
                resolved.append(in_shape[i])
        else:
            resolved.append(t)
    n_batch = sum(1 for t in resolved if is_batch(t))
    b = ctx.batch_axis(0)
    if n_batch == 0 and ctx.fixed_batch and b is not None and ctx.ins[0].batch_k:  # type: ignore[union-attr]
        found = _fixed_batch_axis(ctx.fixed_batch, ctx.ins[0].batch_k, list(in_shape), b,  # type: ignore[union-attr]
                                  [int(t) for t in resolved])
        if found is not None:
            resolved, n_batch = found, 1
    if n_batch == 0:
        return [int(t) for t in resolved]
    if n_batch > 1:
        raise ctx.fail("a Reshape target that repeats the batch size is not supported")
    # Resolve the other entries (including -1) at the dry-run batch, then free the batch entry again.
    dry = [DRY_BATCH * t.k if is_batch(t) else int(t) for t in resolved]
    try:
        out_shape = torch.empty(in_shape, device="meta").reshape(dry).shape
    except RuntimeError as e:
        raise ctx.fail(f"cannot reshape {list(in_shape)} to {resolved}: {e}") from None
    return [-1 if is_batch(t) else int(out_shape[i]) for i, t in enumerate(resolved)]


def prep_reshape(ctx: Ctx) -> Fn:
    target = _reshape_target(ctx)
    return lambda step, a: a[0].reshape(target)


def _axes(ctx: Ctx, what: str) -> list[int] | None:
    if ctx.attr("axes") is not None:
        return [int(x) for x in ctx.attr("axes")]
    if ctx.has(1):
        return ctx.static_ints(1, f"{what} axes")
    return None


def prep_squeeze(ctx: Ctx) -> Fn:
    shape = ctx.shape(0)
    axes = _axes(ctx, "Squeeze")
    b = ctx.batch_axis(0)
    if axes is None:
        axes = [i for i, n in enumerate(shape) if n == 1 and i != b]
    dims = tuple(sorted(a % len(shape) for a in axes)) if shape else ()
    if b is not None and b in dims:
        raise ctx.fail("squeezing the batch axis is not supported")
    if not dims:
        return lambda step, a: a[0]
    if any(shape[d] != 1 for d in dims):
        raise ctx.fail(f"squeezes axes {list(dims)} of a {list(shape)} tensor; only size-1 axes squeeze")

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        # select(d, 0) rather than squeeze(d): the size is known to be 1 here, and a traced squeeze of an axis
        # whose size the tracer does not know exports as an If node, which a re-import refuses
        x = a[0]
        for d in reversed(dims):
            x = x.select(d, 0)
        return x

    return fn


def prep_unsqueeze(ctx: Ctx) -> Fn:
    axes = _axes(ctx, "Unsqueeze") or []
    out_rank = len(ctx.shape(0)) + len(axes)
    dims = sorted(a % out_rank for a in axes)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x = a[0]
        for dim in dims:
            x = x.unsqueeze(dim)
        return x

    return fn


def prep_transpose(ctx: Ctx) -> Fn:
    rank = len(ctx.shape(0))
    perm = [int(p) for p in ctx.attr("perm", list(range(rank))[::-1])]
    return lambda step, a: a[0].permute(perm)


def prep_concat(ctx: Ctx) -> Fn:
    rank = len(ctx.shape(0))
    axis = int(ctx.attr("axis")) % max(rank, 1)
    for i in range(len(ctx.ins)):
        ctx.keep(i, trainable=False)
    n = len(ctx.ins)
    dyn = [i for i, v in enumerate(ctx.ins)
           if isinstance(v, Dyn) and v.batch_axis is not None and v.batch_k == 1]
    b = ctx.batch_axis(dyn[0]) if dyn else None
    grow: set[int] = set()
    fb = ctx.fixed_batch
    if fb and b is not None and b != axis:
        # a fixed-batch export folds `token.expand(batch, ...)` into a constant holding the batch size on the
        # batch axis, every slice the same: it is expanded to the batch at run time
        for i, v in enumerate(ctx.ins):
            if isinstance(v, Const) and not isinstance(v.value, SymInts) and v.value.dim() == rank \
                    and v.value.shape[b] == fb:
                first = v.value.narrow(b, 0, 1)
                if torch.equal(v.value, first.expand_as(v.value)):
                    grow.add(i)
                    ctx.kept[i] = (False, first)
    if not grow:
        return lambda step, a: torch.cat([a[i] for i in range(n) if a[i] is not None], axis)
    ref = dyn[0]

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        size = [a[ref].shape[b] if j == b else -1 for j in range(rank)]
        parts = [a[i].expand(size) if i in grow else a[i] for i in range(n) if a[i] is not None]
        return torch.cat(parts, axis)
    return fn


def _gather_batch_blocks(ctx: Ctx, axis: int, idx: torch.Tensor) -> Fn:
    """Gather along the batch axis of a fixed-batch export: indices that pick the same entries in each sample.

    The dynamo exporter writes ``as_strided`` (ConvNeXt's LayerNorm after pooling) as a flatten to 1-D and a
    Gather of baked flat indices, (B, ...) of them: sample b's entries are sample 0's plus b x k, where k is
    the number of entries per sample on that axis. Read so, the Gather runs per sample at any batch size.
    """
    fb, k = ctx.fixed_batch, ctx.ins[0].batch_k  # type: ignore[union-attr]
    if not fb or not k or idx.dim() == 0 or idx.shape[0] != fb:
        raise ctx.fail("Gather along the batch axis is not supported")
    first = idx[0]
    offsets = torch.arange(fb).reshape(-1, *([1] * first.dim())) * k
    if not torch.equal(idx, first.unsqueeze(0) + offsets) or int(first.min()) < 0 or int(first.max()) >= k:
        raise ctx.fail("Gather along the batch axis is supported only where each sample picks the same "
                       "entries of its own block")
    flat = first.reshape(-1)
    inner = list(first.shape)
    shape = ctx.shape(0)
    ctx.check_size([*shape[:axis], fb, *inner, *shape[axis + 1:]])

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x = a[0].unflatten(axis, (-1, k))
        y = x.index_select(axis + 1, flat.to(x.device))
        return y.unflatten(axis + 1, inner) if inner else y.squeeze(axis + 1)

    return fn


def prep_gather(ctx: Ctx) -> Fn:
    shape = ctx.shape(0)
    axis = int(ctx.attr("axis", 0)) % len(shape)
    idx = ctx.const(1, "Gather indices").long()
    if axis == ctx.batch_axis(0):
        return _gather_batch_blocks(ctx, axis, idx)
    idx = torch.where(idx < 0, idx + shape[axis], idx)
    if idx.dim() == 0:
        i = int(idx)
        return lambda step, a: a[0].select(axis, i)
    ids = [int(v) for v in idx.reshape(-1).tolist()]
    if idx.dim() == 1 and ids and ids == list(range(ids[0], ids[0] + len(ids))):
        # A contiguous run is a slice (cleaner to trace); otherwise index_select with a constant index.
        lo, hi = ids[0], ids[0] + len(ids)
        return lambda step, a: a[0].narrow(axis, lo, hi - lo)
    inner = list(idx.shape)
    ctx.check_size([*shape[:axis], *inner, *shape[axis + 1:]])

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        y = a[0].index_select(axis, torch.tensor(ids, dtype=torch.long, device=a[0].device))
        return y if len(inner) == 1 else y.unflatten(axis, inner)

    return fn


def prep_range(ctx: Ctx) -> Fn:
    # Only ever folded: exporters compute index tables from shapes with it (Swin's window masks).
    start, limit, delta = (ctx.const(i, "a Range bound") for i in range(3))
    if float(delta) == 0:
        raise ctx.fail("Range with a zero step")
    ctx.check_size([max(math.ceil((float(limit) - float(start)) / float(delta)), 0)])
    return lambda step, a: torch.arange(a[0].item(), a[1].item(), a[2].item(), dtype=a[0].dtype)


def prep_scatter_nd(ctx: Ctx) -> Fn:
    reduction = ctx.attr("reduction", "none")
    if isinstance(reduction, bytes):
        reduction = reduction.decode()
    if reduction not in ("none", "add"):
        raise ctx.fail(f"ScatterND reduction {reduction!r} is not supported (only none and add)")
    idx = ctx.const(1, "ScatterND indices").long()
    shape = ctx.shape(0)
    if idx.dim() == 0 or idx.shape[-1] > len(shape):
        raise ctx.fail("ScatterND indices must end in an axis no longer than the data's rank")
    depth = idx.shape[-1]
    b = ctx.batch_axis(0)
    if b is not None and b < depth:
        raise ctx.fail("ScatterND into the batch axis is not supported")
    bound = torch.tensor(shape[:depth]).reshape(*([1] * (idx.dim() - 1)), depth)
    if bool(((idx < -bound) | (idx >= bound)).any()):
        raise ctx.fail("ScatterND indices out of range")
    idx = torch.where(idx < 0, idx + bound, idx)
    ctx.keep(0, trainable=False)
    ctx.keep(2, trainable=False)
    parts = [idx[..., j] for j in range(depth)]

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        where = tuple(p.to(a[0].device) for p in parts)
        return a[0].index_put(where, a[2].to(a[0].dtype), accumulate=reduction == "add")

    return fn


def _slice_spec(ctx: Ctx) -> list[tuple[int, int, int, int]]:
    shape = ctx.shape(0)
    if ctx.opset < 10:
        starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes = list(ctx.attr("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts = ctx.static_ints(1, "Slice starts")
        ends = ctx.static_ints(2, "Slice ends")
        axes = ctx.static_ints(3, "Slice axes") if ctx.has(3) else list(range(len(starts)))
        steps = ctx.static_ints(4, "Slice steps") if ctx.has(4) else [1] * len(starts)
    spec = []
    for st, en, ax, sp in zip(starts, ends, axes, steps, strict=True):
        ax = int(ax) % len(shape)
        if sp == 0:
            raise ctx.fail("Slice with step 0 is invalid")
        # ONNX clamps starts/ends like Python slices do; resolve them against the static size.
        lo, hi, _ = slice(int(st), int(en), int(sp)).indices(shape[ax])
        spec.append((ax, lo, hi, int(sp)))
    return spec


def prep_slice(ctx: Ctx) -> Fn:
    spec = _slice_spec(ctx)
    b = ctx.batch_axis(0)
    index: list[slice] = [slice(None)] * len(ctx.shape(0))
    # torch slices take positive steps only; negative ones (exporters reverse pad lists) gather indices.
    reversed_axes: list[tuple[int, list[int]]] = []
    for ax, lo, hi, sp in spec:
        if ax == b:
            if (lo, hi, sp) != (0, ctx.shape(0)[ax], 1):
                raise ctx.fail("slicing the batch axis is not supported")
            continue
        if sp > 0:
            index[ax] = slice(lo, hi, sp)
        else:
            reversed_axes.append((ax, list(range(lo, hi, sp))))
    tup = tuple(index)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x = a[0][tup]
        for ax, ids in reversed_axes:
            x = x.index_select(ax, torch.tensor(ids, dtype=torch.long, device=x.device))
        return x

    return fn


def prep_cast(ctx: Ctx) -> Fn:
    to = int(ctx.attr("to"))
    if to in _FLOAT_TYPES:
        # The interpreter computes in float32 throughout.
        return lambda step, a: a[0].float()
    if isinstance(ctx.ins[0], Dyn):
        raise ctx.fail("casting the input-dependent tensor to a non-float type is not supported")
    if to not in _INT_TYPES:
        raise ctx.fail(f"Cast to type {onnx.TensorProto.DataType.Name(to)} is not supported")
    dtype = _INT_TYPES[to]
    return lambda step, a: a[0].to(dtype)


def prep_pad(ctx: Ctx) -> Fn:
    rank = len(ctx.shape(0))
    mode = str(ctx.attr("mode", "constant"))
    if ctx.opset < 11:
        pads, value = [int(p) for p in ctx.attr("pads")], float(ctx.attr("value", 0.0))
        axes = list(range(rank))
    else:
        pads = ctx.static_ints(1, "Pad pads")
        value = float(ctx.const(2, "Pad constant_value").reshape(-1)[0]) if ctx.has(2) else 0.0
        axes = [a % rank for a in ctx.static_ints(3, "Pad axes")] if ctx.has(3) else list(range(rank))
    n = len(axes)
    begin = dict(zip(axes, pads[:n], strict=True))
    end = dict(zip(axes, pads[n:], strict=True))
    b = ctx.batch_axis(0)
    if b is not None and (begin.get(b, 0) or end.get(b, 0)):
        raise ctx.fail("padding the batch axis is not supported")
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise ctx.fail(f"Pad mode {mode!r} is not supported")
    if mode != "constant" and any(begin.get(i, 0) or end.get(i, 0) for i in range(min(2, rank))):
        raise ctx.fail(f"Pad mode {mode!r} on the batch or channel axis is not supported")
    torch_pad: list[int] = []
    # F.pad lists (begin, end) pairs from the last axis backwards; non-constant modes pad spatial axes only.
    first = 0 if mode == "constant" else 2
    for ax in range(rank - 1, first - 1, -1):
        torch_pad += [begin.get(ax, 0), end.get(ax, 0)]
    while len(torch_pad) > 2 and torch_pad[-2:] == [0, 0]:
        torch_pad = torch_pad[:-2]
    ctx.check_size([d + begin.get(i, 0) + end.get(i, 0) for i, d in enumerate(ctx.shape(0))])
    tmode = modes[mode]
    if tmode == "constant":
        return lambda step, a: F.pad(a[0], torch_pad, value=value)
    return lambda step, a: F.pad(a[0], torch_pad, mode=tmode)


def _nearest_index(out_n: int, in_n: int, scale: float, coord: str, nearest: str) -> list[int]:
    """Source indices of ONNX nearest Resize along one axis (exactly as the spec computes them)."""
    idx = []
    for x in range(out_n):
        if coord == "asymmetric":
            xo = x / scale
        elif coord == "half_pixel":
            xo = (x + 0.5) / scale - 0.5
        elif coord == "pytorch_half_pixel":
            xo = (x + 0.5) / scale - 0.5 if out_n > 1 else 0.0
        elif coord == "align_corners":
            xo = x * (in_n - 1) / (out_n - 1) if out_n > 1 else 0.0
        elif coord == "tf_half_pixel_for_nn":
            xo = (x + 0.5) / scale
        else:
            raise ValueError(coord)
        if nearest == "floor":
            i = math.floor(xo)
        elif nearest == "ceil":
            i = math.ceil(xo)
        elif nearest == "round_prefer_ceil":
            i = math.floor(xo + 0.5)
        else:  # round_prefer_floor
            i = math.ceil(xo - 0.5)
        idx.append(min(max(i, 0), in_n - 1))
    return idx


def prep_resize(ctx: Ctx) -> Fn:
    _need_rank4(ctx)
    n, c, h, w = ctx.shape(0)
    if ctx.opset < 11:
        raise ctx.fail("Resize before opset 11 is not supported; re-export with opset >= 17")
    mode = str(ctx.attr("mode", "nearest"))
    coord = str(ctx.attr("coordinate_transformation_mode", "half_pixel"))
    nearest = str(ctx.attr("nearest_mode", "round_prefer_floor"))
    if int(ctx.attr("antialias", 0)) or ctx.attr("axes") is not None:
        raise ctx.fail("Resize with antialias or axes is not supported")
    scales: list[float] | None = None
    if ctx.has(3):
        size = ctx.ints(3, "Resize sizes")[-2:]
        if any(is_batch(v) for v in size):
            raise ctx.fail("Resize sizes depend on the batch size")
        out_hw = [int(v) for v in size]
    else:
        sc = [float(v) for v in ctx.const(2, "Resize scales").reshape(-1).tolist()]
        if len(sc) != 4 or sc[0] != 1.0 or sc[1] != 1.0:
            raise ctx.fail("Resize must scale only the spatial axes")
        scales = sc[2:]
        out_hw = [math.floor(h * scales[0]), math.floor(w * scales[1])]
    ctx.check_size([n, c, *out_hw])
    if min(out_hw) <= 0:
        raise ctx.fail(f"Resize to {out_hw} leaves no pixels")
    eff = scales or [out_hw[0] / h, out_hw[1] / w]
    if mode == "nearest":
        supported = (
            "asymmetric",
            "half_pixel",
            "pytorch_half_pixel",
            "align_corners",
            "tf_half_pixel_for_nn",
        )
        if coord not in supported:
            raise ctx.fail(f"nearest Resize with coordinate_transformation_mode={coord!r} is not supported")
        ih = _nearest_index(out_hw[0], h, eff[0], coord, nearest)
        iw = _nearest_index(out_hw[1], w, eff[1], coord, nearest)
        if coord == "asymmetric" and nearest == "floor" and scales and all(s == int(s) for s in scales):
            # Integer upsampling: torch's nearest gives the same indices and traces to a plain Resize.
            factor = (float(scales[0]), float(scales[1]))
            return lambda step, a: F.interpolate(a[0], scale_factor=factor, mode="nearest")

        def fn(step: Step, a: list[Any]) -> torch.Tensor:
            x = a[0]
            dev = x.device
            x = x.index_select(2, torch.tensor(ih, dtype=torch.long, device=dev))
            return x.index_select(3, torch.tensor(iw, dtype=torch.long, device=dev))

        return fn
    if mode == "linear":
        if coord in ("half_pixel", "pytorch_half_pixel"):
            align = False
        elif coord == "align_corners":
            align = True
        else:
            raise ctx.fail(f"linear Resize with coordinate_transformation_mode={coord!r} is not supported")
        if scales is not None and not align:
            factor = (float(scales[0]), float(scales[1]))
            return lambda step, a: F.interpolate(
                a[0], scale_factor=factor, mode="bilinear", align_corners=False
            )
        size = (out_hw[0], out_hw[1])
        return lambda step, a: F.interpolate(a[0], size=size, mode="bilinear", align_corners=align)
    raise ctx.fail(f"Resize mode {mode!r} is not supported (use nearest or linear)")


def prep_gemm(ctx: Ctx) -> Fn:
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    ta, tb = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    ctx.keep(0, trainable=True)
    ctx.keep(1, trainable=True)
    ctx.keep(2, trainable=True)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x = a[0].t() if ta else a[0]
        w = a[1].t() if tb else a[1]
        y = x @ w
        if alpha != 1.0:
            y = y * alpha
        if a[2] is not None:
            y = y + (a[2] * beta if beta != 1.0 else a[2])
        return y

    return fn


def prep_matmul(ctx: Ctx) -> Fn:
    a_shape, b_shape = ctx.shape(0), ctx.shape(1)
    if len(a_shape) >= 2 and len(b_shape) >= 2:
        try:
            lead = torch.broadcast_shapes(tuple(a_shape[:-2]), tuple(b_shape[:-2]))
        except RuntimeError as e:
            raise ctx.fail(f"inputs do not broadcast: {e}") from None
        ctx.check_size([*lead, a_shape[-2], b_shape[-1]])
    ctx.keep(0, trainable=True)
    ctx.keep(1, trainable=True)
    return lambda step, a: torch.matmul(a[0], a[1])


def prep_layer_norm(ctx: Ctx) -> Fn:
    """LayerNormalization (opset 17): normalises over the axes from ``axis`` on; scale and bias are
    fine-tuned."""
    rank = len(ctx.shape(0))
    axis = int(ctx.attr("axis", -1)) % rank
    eps = float(ctx.attr("epsilon", 1e-5))
    ctx.keep(1, trainable=True)
    ctx.keep(2, trainable=True)
    dims = tuple(range(axis, rank))
    # the normalised shape, resolved now (static: it never includes the batch axis when axis > 0), so that a
    # re-export traces a plain layer_norm
    norm = tuple(ctx.shape(0)[axis:])
    fused = (axis > 0 and ctx.is_const(1) and tuple(ctx.const(1, "scale").shape) == norm
             and (not ctx.has(2) or (ctx.is_const(2) and tuple(ctx.const(2, "bias").shape) == norm)))

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        x, scale, bias = a[0], a[1], a[2]
        if fused:
            return F.layer_norm(x, norm, scale, bias, eps)
        mu = x.mean(dims, keepdim=True)
        var = (x - mu).pow(2).mean(dims, keepdim=True)
        y = (x - mu) / torch.sqrt(var + eps) * scale
        return y if bias is None else y + bias

    return fn


def prep_expand(ctx: Ctx) -> Fn:
    """Expand to a constant shape (numpy-style broadcast both ways).

    The shape may hold the symbolic batch size;
    its run-time value then comes from the graph input, bound by the interpreter in slot ``_BATCH_SLOT``."""
    shape = ctx.ints(1, "Expand shape")
    ctx.check_size([DRY_BATCH * v.k if is_batch(v) else v for v in shape])
    ctx.keep(0, trainable=False)

    def fn(step: Step, a: list[Any]) -> torch.Tensor:
        # as ``Tensor.expand`` sizes (-1 keeps a dimension): re-exporting the module traces the batch size
        x = a[0]
        n = max(x.dim(), len(shape))
        padded = [1] * (n - len(shape)) + list(shape)
        lead = n - x.dim()
        sizes = [a[_BATCH_SLOT].shape[0] * v.k if is_batch(v) else (v if i < lead or v != 1 else -1)
                 for i, v in enumerate(padded)]
        return x.expand(*sizes)

    return fn


def prep_where(ctx: Ctx) -> Fn:
    _check_broadcast(ctx, (0, 1, 2))
    ctx.keep(0, trainable=False)
    ctx.keep(1, trainable=False)
    ctx.keep(2, trainable=False)
    return lambda step, a: torch.where(a[0].bool(), a[1], a[2])


def _compare(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    def prep(ctx: Ctx) -> Fn:
        _check_broadcast(ctx, (0, 1))
        ctx.keep(0, trainable=False)
        ctx.keep(1, trainable=False)
        return lambda step, a: op(a[0], a[1])

    return prep


def prep_mod(ctx: Ctx) -> Fn:
    ctx.keep(0, trainable=False)
    ctx.keep(1, trainable=False)
    if int(ctx.attr("fmod", 0)):
        return lambda step, a: torch.fmod(a[0], a[1])
    return lambda step, a: torch.remainder(a[0], a[1])


def split_sizes(ctx: Ctx, n_out: int) -> tuple[int, list[int]]:
    """Split's axis and the static size of each of its ``n_out`` parts (from ``split``, or equal parts)."""
    shape = ctx.shape(0)
    axis = int(ctx.attr("axis", 0)) % len(shape)
    if axis == ctx.batch_axis(0):
        raise ctx.fail("splitting the batch axis is not supported")
    if ctx.attr("split") is not None:
        sizes = [int(v) for v in ctx.attr("split")]
    elif ctx.has(1):
        sizes = ctx.static_ints(1, "Split sizes")
    else:
        whole, rest = divmod(shape[axis], n_out)
        ceil = whole + (1 if rest else 0)  # opset 18: the last part takes what is left
        sizes = [ceil] * (n_out - 1) + [shape[axis] - ceil * (n_out - 1)]
    if len(sizes) != n_out or sum(sizes) != shape[axis] or min(sizes) < 0:
        raise ctx.fail(f"split sizes {sizes} do not divide axis {axis} of size {shape[axis]} "
                       f"into {n_out} parts")
    return axis, sizes


def prep_constant_of_shape(ctx: Ctx) -> Fn:
    # Only ever folded (its input is a shape); exporters use it to build Pad amounts.
    shape = ctx.static_ints(0, "ConstantOfShape shape")
    ctx.check_size(shape)
    value = ctx.attr("value")
    fill = value.reshape(-1)[0] if isinstance(value, torch.Tensor) else torch.tensor(0.0)
    return lambda step, a: torch.full(shape, fill.item(), dtype=fill.dtype)


PREPARERS: dict[str, Callable[[Ctx], Fn]] = {
    "ConstantOfShape": prep_constant_of_shape,
    "Conv": prep_conv,
    "ConvTranspose": prep_conv_transpose,
    "BatchNormalization": prep_batchnorm,
    "Relu": _unary(F.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Abs": _unary(torch.abs),
    "Neg": _unary(torch.neg),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Erf": _unary(torch.erf),
    "Softplus": _unary(F.softplus),
    "Mish": _unary(F.mish),
    "Selu": prep_selu,
    "Celu": prep_celu,
    "InstanceNormalization": prep_instance_norm,
    "DepthToSpace": _depth_space(True),
    "SpaceToDepth": _depth_space(False),
    "Einsum": prep_einsum,
    "LeakyRelu": prep_leaky_relu,
    "Elu": prep_elu,
    "PRelu": prep_prelu,
    "Clip": prep_clip,
    "HardSigmoid": prep_hard_sigmoid,
    "HardSwish": prep_hard_swish,
    "Gelu": prep_gelu,
    "Softmax": prep_softmax,
    "Pow": prep_pow,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div, lambda x, y: torch.div(x, y, rounding_mode="trunc")),
    "MaxPool": prep_maxpool,
    "AveragePool": prep_avgpool,
    "GlobalAveragePool": prep_global_avg,
    "GlobalMaxPool": prep_global_max,
    "ReduceMean": _reduce("ReduceMean"),
    "ReduceSum": _reduce("ReduceSum"),
    "ReduceMax": _reduce("ReduceMax"),
    "ReduceMin": _reduce("ReduceMin"),
    "ReduceL2": _reduce("ReduceL2"),
    "ReduceL1": _reduce("ReduceL1"),
    "ReduceSumSquare": _reduce("ReduceSumSquare"),
    "ReduceProd": _reduce("ReduceProd"),
    "Flatten": prep_flatten,
    "Reshape": prep_reshape,
    "Squeeze": prep_squeeze,
    "Unsqueeze": prep_unsqueeze,
    "Transpose": prep_transpose,
    "Concat": prep_concat,
    "Gather": prep_gather,
    "Slice": prep_slice,
    "Cast": prep_cast,
    "Pad": prep_pad,
    "Resize": prep_resize,
    "Gemm": prep_gemm,
    "MatMul": prep_matmul,
    "Identity": prep_identity,
    "Dropout": prep_identity,
    "LayerNormalization": prep_layer_norm,
    "Expand": prep_expand,
    "Where": prep_where,
    "Equal": _compare(torch.eq),
    "Less": _compare(torch.lt),
    "Greater": _compare(torch.gt),
    "Not": _unary(torch.logical_not),
    "Max": _binary(torch.maximum),
    "Min": _binary(torch.minimum),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Mod": prep_mod,
    "Range": prep_range,
    "ScatterND": prep_scatter_nd,
}

#: Every op type (default ``ai.onnx`` domain) the interpreter reads; ``check_onnx_bytes`` refuses others.
ALLOWED_OPS: frozenset[str] = frozenset(PREPARERS) | {"Constant", "Shape", "Split"}


# ----------------------------------------------------------------------------------------------------------
# Constant folding of shape arithmetic that involves the symbolic batch size.


def _as_list(v: Value | None) -> tuple[list[Any], bool] | None:
    if not isinstance(v, Const):
        return None
    if isinstance(v.value, SymInts):
        return list(v.value.values), v.value.scalar
    t = v.value
    if t.is_floating_point() or t.dim() > 1:
        return None
    return [int(x) for x in t.reshape(-1).tolist()], t.dim() == 0


def _sym_or_tensor(values: list[Any], scalar: bool) -> Const:
    if any(is_batch(v) for v in values):
        return Const(SymInts(tuple(values), scalar))
    t = torch.tensor(values, dtype=torch.int64)
    return Const(t.reshape(()) if scalar else t)


def fold_symbolic(ctx: Ctx) -> Const:
    """Folds a node one of whose inputs is a :class:`SymInts` shape."""
    op = ctx.node.op_type
    lists = [_as_list(v) for v in ctx.ins]
    if any(lst is None for lst, v in zip(lists, ctx.ins, strict=True) if v is not None):
        raise ctx.fail("mixes the symbolic batch size with non-integer data")
    vals, scalar = lists[0]  # type: ignore[misc]
    if op in ("Identity", "Cast"):
        if op == "Cast" and int(ctx.attr("to")) not in _INT_TYPES:
            raise ctx.fail("casting the batch size to a non-integer type is not supported")
        return _sym_or_tensor(vals, scalar)
    if op == "Gather":
        idx = ctx.const(1, "Gather indices")
        picked = [vals[int(i)] for i in idx.reshape(-1).tolist()]
        return _sym_or_tensor(picked, idx.dim() == 0)
    if op == "Slice":
        if scalar:
            raise ctx.fail("slicing a scalar shape entry is not supported")
        out_vals = list(vals)
        for _, lo, hi, sp in _slice_spec(ctx):
            out_vals = [out_vals[i] for i in range(lo, hi, sp)]
        return _sym_or_tensor(out_vals, False)
    if op == "Concat":
        out: list[Any] = []
        for lst in lists:
            if lst is not None:
                out += lst[0]
        return _sym_or_tensor(out, False)
    if op == "Unsqueeze":
        if not scalar:
            raise ctx.fail("unsqueezing a 1-D shape is not supported")
        return _sym_or_tensor(vals, False)
    if op == "Squeeze":
        if len(vals) != 1:
            raise ctx.fail("squeezing a shape of length != 1 is not supported")
        return _sym_or_tensor(vals, True)
    if op == "Reshape":
        return _sym_or_tensor(vals, False)
    if op == "Equal":
        other, oscalar = lists[1]  # type: ignore[misc]
        n = max(len(vals), len(other))
        if len(vals) != len(other) and min(len(vals), len(other)) != 1:
            raise ctx.fail("shape comparison with mismatched lengths")
        xs, ys = (vals * n if len(vals) == 1 else vals), (other * n if len(other) == 1 else other)
        eq: list[bool] = []
        for x, y in zip(xs, ys, strict=True):
            if is_batch(x) and is_batch(y):
                eq.append(x == y)
            elif is_batch(x) or is_batch(y):
                known = y if is_batch(x) else x
                if known > 0:  # the batch size could be any positive number
                    raise ctx.fail("comparing the batch size with a positive number is not supported")
                eq.append(False)
            else:
                eq.append(x == y)
        t = torch.tensor(eq, dtype=torch.bool)
        return Const(t.reshape(()) if scalar and oscalar else t)
    if op == "Where":
        cond, _ = lists[0]  # type: ignore[misc]
        (a, _), (b, bscalar) = lists[1], lists[2]  # type: ignore[misc]
        n = max(len(cond), len(a), len(b))
        pick = [(a * n if len(a) == 1 else a)[i] if (cond * n if len(cond) == 1 else cond)[i]
                else (b * n if len(b) == 1 else b)[i] for i in range(n)]
        return _sym_or_tensor(pick, scalar and bscalar)
    if op in ("Mul", "Add", "Sub", "Div", "Mod"):
        other, oscalar = lists[1]  # type: ignore[misc]
        if len(vals) != len(other) and min(len(vals), len(other)) != 1:
            raise ctx.fail("shape arithmetic with mismatched lengths")
        n = max(len(vals), len(other))
        xs = vals * n if len(vals) == 1 else vals
        ys = other * n if len(other) == 1 else other
        res: list[Any] = []
        for x, y in zip(xs, ys, strict=True):
            if is_batch(x) or is_batch(y):
                if op == "Mul" and not (is_batch(x) and is_batch(y)):
                    b, m = (x, y) if is_batch(x) else (y, x)
                    res.append(_Batch(b.k * int(m)))
                    continue
                if op == "Div" and is_batch(x) and not is_batch(y) and int(y) > 0 and x.k % int(y) == 0:
                    res.append(_Batch(x.k // int(y)))
                    continue
                raise ctx.fail("arithmetic on the batch size is not supported; reshape with -1 instead")
            if op == "Mod":
                if not y:
                    raise ctx.fail("shape arithmetic: modulo by zero")
                res.append(int(math.fmod(x, y)) if int(ctx.attr("fmod", 0)) else x % y)
                continue
            res.append({"Mul": x * y, "Add": x + y, "Sub": x - y, "Div": int(x / y) if y else 0}[op])
        return _sym_or_tensor(res, scalar and oscalar)
    raise ctx.fail("cannot use the symbolic batch size here")


# ----------------------------------------------------------------------------------------------------------
# The interpreter loop.


@dataclass
class Interpreted:
    """The outcome of :func:`interpret`."""

    values: dict[str, Value]
    steps: dict[str, Step]  # output name -> the step computing it (input-dependent values only)
    producers: dict[str, onnx.NodeProto]


class _Frozen:
    """Stands in for a Step while folding constants (folding runs as in eval mode)."""

    training = False


def _narrow(axis: int, lo: int, n: int) -> Fn:
    return lambda step, a: a[0].narrow(axis, lo, n)


def step_fail(step: Step, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{step.op_type} node computing {step.output!r}: {what}")


def interpret(graph: onnx.GraphProto, input_name: str, example: torch.Tensor, opset: int,
              fixed_batch: int | None = None) -> Interpreted:
    """Reads every node of ``graph`` once: folds constants and builds a :class:`Step` for the rest.

    Args:
        graph: a graph that passed ``check_onnx_bytes`` (topologically sorted, allowed ops only).
        input_name: the graph input fed with ``example``.
        example: the dry-run input, (DRY_BATCH, C, H, W) float32.
        opset: the default-domain opset the graph was written for.
        fixed_batch: the batch size the graph's input declares, when it declares one; constants that hold it
            where a dynamic export would compute the batch (a flatten's Reshape target, a batch-1 class token)
            are read as the batch, so the module runs at every batch size.

    Raises:
        UnsupportedModelError: a node uses an unsupported form of its op, or the dry run fails.
    """
    values: dict[str, Value] = {init.name: Const(tensor_from_proto(init)) for init in graph.initializer}
    values[input_name] = Dyn(example)
    steps: dict[str, Step] = {}
    producers: dict[str, onnx.NodeProto] = {}
    env: dict[str, torch.Tensor] = {input_name: example}
    # A second dry run, one sample larger, runs beside the first: the axis whose size differs between the two
    # is each value's batch axis (attention blocks move the batch off axis 0 and back).
    env_more: dict[str, torch.Tensor] = {input_name: torch.cat([example, example[:1]])}

    def run(step: Step, outs: list[str]) -> None:
        with torch.no_grad():
            y, y_more = step(env), step(env_more)
        if y.dim() != y_more.dim():
            raise step_fail(step, "its rank depends on the batch size")
        grown = [i for i in range(y.dim()) if y.shape[i] != y_more.shape[i]]
        if len(grown) > 1:
            raise step_fail(step, f"the batch size changes several axes ({grown}) of its output")
        env[outs[0]], env_more[outs[0]] = y, y_more
        k = 1
        if grown:
            k = y_more.shape[grown[0]] - y.shape[grown[0]]
            k = k if k > 0 and y.shape[grown[0]] == DRY_BATCH * k else 0
        values[outs[0]] = Dyn(y, grown[0] if grown else None, k)
        steps[outs[0]] = step
    # Free each dry-run activation after its last use (keeping its shape on the meta device), so a large
    # input does not keep every intermediate of the graph in memory at once.
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in list(node.input) + list(node.output):
            if name:
                last_use[name] = i
    for out in graph.output:
        last_use[out.name] = len(graph.node)
    free_after: dict[int, list[str]] = {}
    for name, i in last_use.items():
        free_after.setdefault(i, []).append(name)
    for index, node in enumerate(graph.node):
        for name in free_after.get(index - 1, ()):
            v = values.get(name)
            if isinstance(v, Dyn) and name != input_name:
                values[name] = Dyn(torch.empty(v.example.shape, device="meta"), v.batch_axis, v.batch_k)
                env.pop(name, None)
                env_more.pop(name, None)
        for out in node.output:
            if out:
                producers[out] = node
        ins: list[Value | None] = []
        for name in node.input:
            if not name:
                ins.append(None)
                continue
            if name not in values:
                raise _fail(node, f"input {name!r} is not produced by any earlier node")
            ins.append(values[name])
        ctx = Ctx(node, ins, opset, fixed_batch)
        op = node.op_type
        outs = [o for o in node.output if o]
        if not outs:
            continue
        if len(outs) > 1 and op not in ("Dropout", "BatchNormalization", "MaxPool", "Split"):
            raise ctx.fail("nodes with several outputs are not supported")
        try:
            if op == "Constant":
                if len(ctx.attrs) != 1:
                    raise ctx.fail("a Constant needs exactly one value attribute")
                ((key, val),) = ctx.attrs.items()
                if key == "value":
                    values[outs[0]] = Const(val)
                elif key in ("value_float", "value_floats"):
                    values[outs[0]] = Const(torch.tensor(val, dtype=torch.float32))
                elif key in ("value_int", "value_ints"):
                    values[outs[0]] = Const(torch.tensor(val, dtype=torch.int64))
                else:
                    raise ctx.fail(f"Constant {key} is not supported")
                continue
            if op == "Shape":
                shape = list(ctx.shape(0))
                b = ctx.batch_axis(0)
                if b is not None:
                    k = ins[0].batch_k  # type: ignore[union-attr]
                    if not k:
                        raise ctx.fail("the size of the batch axis here is not a multiple of the batch size")
                    shape[b] = _Batch(k)  # type: ignore[call-overload]
                start, end = ctx.attr("start", 0), ctx.attr("end", None)
                shape = shape[slice(start, end)]
                values[outs[0]] = _sym_or_tensor(shape, False)
                continue
            if op == "Split":
                axis, sizes = split_sizes(ctx, len(node.output))
                offsets = [sum(sizes[:j]) for j in range(len(sizes))]
                dyn_inputs = {0: node.input[0]} if isinstance(ins[0], Dyn) else {}
                for j, out in enumerate(node.output):
                    if not out:
                        continue
                    part = _narrow(axis, offsets[j], sizes[j])
                    if not dyn_inputs:
                        x0 = ctx.const(0, "Split input")
                        values[out] = Const(part(_Frozen(), [x0]).detach())  # type: ignore[arg-type]
                        continue
                    step = Step(op, part, 1, dyn_inputs, {}, out)
                    step.eval()
                    run(step, [out])
                continue
            shape_in = ins[1] if len(ins) > 1 else None
            sym_expand = (op == "Expand" and isinstance(shape_in, Const)
                          and isinstance(shape_in.value, SymInts)
                          and any(is_batch(v) for v in shape_in.value.values))
            if sym_expand:
                # the output depends on the batch size only: a step that reads it from the graph input
                fn = PREPARERS[op](ctx)
                dyn_inputs = {i: name for i, (name, v) in enumerate(zip(node.input, ins, strict=True))
                              if isinstance(v, Dyn)}
                dyn_inputs[_BATCH_SLOT] = input_name
                step = Step(op, fn, len(ins), dyn_inputs, ctx.kept, outs[0])
                step.eval()
                run(step, outs)
                continue
            if all(isinstance(v, Const) for v in ins if v is not None):
                if any(isinstance(v, Const) and isinstance(v.value, SymInts) for v in ins):
                    values[outs[0]] = fold_symbolic(ctx)
                    continue
                fn = PREPARERS[op](ctx)
                with torch.no_grad():
                    args = [v.value if isinstance(v, Const) else None for v in ins]
                    args += [None] * (_MIN_ARGS - len(args))
                    values[outs[0]] = Const(fn(_Frozen(), args).detach())  # type: ignore[arg-type]
                continue
            fn = PREPARERS[op](ctx)
            dyn_inputs = {
                i: name for i, (name, v) in enumerate(zip(node.input, ins, strict=True)) if isinstance(v, Dyn)
            }
            # Dynamic inputs win over constants in the same slot; constants not kept were resolved into fn.
            step = Step(op, fn, len(ins), dyn_inputs, ctx.kept, outs[0])
            step.eval()  # the dry run must not update BatchNorm running statistics
            run(step, outs)
        except UnsupportedModelError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as e:
            raise _fail(node, f"cannot be evaluated ({type(e).__name__}: {e})") from None
    return Interpreted(values, steps, producers)
