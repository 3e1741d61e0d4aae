"""What an ONNX file may ask of onnxruntime before neusub runs it.

An ONNX file is a program: a ``Loop`` can run forever, a ``ConstantOfShape`` or a pooling
window can ask for any amount of memory or time. A file is therefore run only when, before
anything executes,

- its graph is made of the ops of :data:`BOUNDED_OPS` (standard ONNX ops whose cost follows from
  the shapes of their inputs and outputs: no control flow, no custom ops, no functions), with one
  input and its weights inside the file (no external data);
- every tensor's shape follows from the input's shape for one sample (ONNX shape inference),
  and each tensor stays within :data:`MAX_ELEMENTS` elements and the whole graph within
  :data:`MAX_MULTIPLY_ADDS` multiply-adds per sample.

Every network ``neusub export`` writes (float or INT8) is far inside these bounds: a ResNet-50 at
224² pixels has 2^21.6 elements in its largest tensor and 2^32 multiply-adds.
"""

from __future__ import annotations

import math

from .files import first_line

MAX_ELEMENTS = 2**28  # one tensor of one sample: 1 GiB in float32
MAX_MULTIPLY_ADDS = 2**40  # one sample through the whole graph

# Costs about one operation per element of their inputs and outputs.
_ELEMENTWISE = {
    *("Abs", "Neg", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "Mish", "Softplus"),
    *("Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Pow"),
    *("Clip", "Floor", "Ceil", "Round", "Sign", "Identity", "Cast", "Dropout", "IsNaN", "IsInf", "Not"),
    *("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Mean", "Sum", "Where", "And", "Or", "Xor"),
    *("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"),
    *("BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization"),
    *("LpNormalization", "Softmax", "LogSoftmax", "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool"),
    *("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare"),
    *("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather"),
    *("GatherElements", "Shape", "Size", "Constant", "ConstantOfShape", "Expand", "Tile", "Pad", "Range"),
    *("DepthToSpace", "SpaceToDepth", "Resize", "QuantizeLinear", "DequantizeLinear"),
}
# Cost one operation per output element and window position (or weight column).
_WINDOWED = {"Conv", "MaxPool", "AveragePool", "LpPool", "Gemm", "MatMul"}
BOUNDED_OPS = frozenset(_ELEMENTWISE | _WINDOWED)


def _refuse(where: str, problem: str) -> ValueError:
    return ValueError(
        f"{where} {problem}; neusub runs only ONNX files whose cost is bounded before they run "
        "(as every file of `neusub export` is) — nothing was run"
    )


def check_bounded(proto, where: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the ``ModelProto`` for one sample, once the file passes the
    rules of this module; ``ValueError`` naming the first rule it breaks."""
    import onnx

    if not proto.HasField("graph"):
        raise ValueError(f"{where} is not an ONNX model (it holds no graph)")
    _check_ops(proto, where)
    _check_initializers(proto, where)  # before the checker, which would read external data
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ValueError(f"{where} is not a valid ONNX model ({first_line(err)})") from None
    shapes = _inferred_shapes(proto, where)
    total = 0
    for node in proto.graph.node:
        for name in filter(None, node.output):
            if name not in shapes:
                raise _refuse(
                    where, f"has a tensor ({name!r}, of {node.op_type}) whose size only running tells"
                )
            elements = math.prod(shapes[name])
            if elements > MAX_ELEMENTS:
                raise _refuse(where, f"asks for {elements:,} elements in {name!r} (at most {MAX_ELEMENTS:,})")
        total += _cost(node, shapes)
    if total > MAX_MULTIPLY_ADDS:
        raise _refuse(where, f"asks for {total:.3g} operations per sample (at most {MAX_MULTIPLY_ADDS:.3g})")
    return shapes


def _check_ops(proto, where: str) -> None:
    if proto.functions:
        raise _refuse(where, f"defines functions ({proto.functions[0].name})")
    if proto.graph.sparse_initializer:  # densified when loaded: any size for a few stored values
        raise _refuse(where, "holds sparse initializers")
    refused = sorted(
        {
            f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            for node in proto.graph.node
            if node.domain not in ("", "ai.onnx") or node.op_type not in BOUNDED_OPS
        }
    )
    if refused:
        raise _refuse(where, f"uses ops whose cost is not bounded by its shapes ({', '.join(refused)})")
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [v for v in proto.graph.input if v.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"{where} has {len(inputs)} inputs; neusub runs networks of one input")


_STORAGE = {  # where a TensorProto keeps its values, by data type, when not in raw_data
    1: "float_data",
    2: "int32_data",
    3: "int32_data",
    4: "int32_data",
    5: "int32_data",
    6: "int32_data",
    7: "int64_data",
    9: "int32_data",
    10: "int32_data",
    11: "double_data",
    12: "uint64_data",
    13: "uint64_data",
    16: "int32_data",
}


def _stored_tensors(proto):
    """Every tensor whose values the file stores: initializers and the values of Constant nodes."""
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t


def _check_initializers(proto, where: str) -> None:
    """Every stored tensor holds the values its shape claims, inside the file."""
    import onnx

    for tensor in _stored_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
            raise _refuse(where, f"keeps tensor {tensor.name!r} in an external file")
        claimed = math.prod(tensor.dims)
        if tensor.raw_data:
            size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
            stored = len(tensor.raw_data) // size
        else:
            stored = len(getattr(tensor, _STORAGE.get(tensor.data_type, "string_data")))
        if stored != claimed:
            raise _refuse(
                where, f"claims {claimed:,} values for tensor {tensor.name!r} but stores {stored:,}"
            )


def _inferred_shapes(proto, where: str) -> dict[str, tuple[int, ...]]:
    """ONNX shape inference for one sample (a symbolic first input axis is the batch: 1)."""
    import onnx

    one = onnx.ModelProto()
    one.CopyFrom(proto)
    initializers = {t.name for t in one.graph.initializer}
    (graph_input,) = (v for v in one.graph.input if v.name not in initializers)
    dims = graph_input.type.tensor_type.shape.dim
    if dims and not dims[0].HasField("dim_value"):
        dims[0].dim_value = 1  # sets the oneof: the symbolic name goes
    if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        raise _refuse(where, "takes an input whose sample shape is not fixed")
    try:
        inferred = onnx.shape_inference.infer_shapes(one, strict_mode=True, data_prop=True)
    except Exception as err:  # onnx's InferenceError, ValidationError, protobuf errors
        raise _refuse(where, f"has shapes ONNX cannot infer ({first_line(err)})") from None
    shapes = {t.name: tuple(t.dims) for t in inferred.graph.initializer}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in tensor_type.shape.dim):
            shapes[value.name] = tuple(d.dim_value for d in tensor_type.shape.dim)
    return shapes


def _cost(node, shapes: dict[str, tuple[int, ...]]) -> int:
    """Operations of ``node`` for one sample: per output element, its window or weight column."""
    out = math.prod(shapes[node.output[0]])
    if node.op_type == "Conv":
        return out * math.prod(shapes.get(node.input[1], (1, 1))[1:])
    if node.op_type in ("MaxPool", "AveragePool", "LpPool"):
        kernel = next((list(a.ints) for a in node.attribute if a.name == "kernel_shape"), [1])
        return out * math.prod(kernel)
    if node.op_type in ("Gemm", "MatMul"):
        a = shapes.get(node.input[0], (1,))
        transposed = any(attr.name == "transA" and attr.i for attr in node.attribute)
        return out * (a[0] if transposed and len(a) == 2 else a[-1])
    return sum(math.prod(shapes.get(name, ())) for name in [*node.input, *node.output] if name)


def non_finite_tensors(proto) -> list[str]:
    """The names of the stored floating-point tensors that hold NaN or inf."""
    import numpy as np
    from onnx import numpy_helper

    names = []
    for tensor in _stored_tensors(proto):
        values = numpy_helper.to_array(tensor)
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            names.append(tensor.name or "a constant")
    return names
