"""`cli.py check`: verify on the CPU what a TensorRT build of an exported folder relies on.

Rules (docs/design.md section 3; onnx-tensorrt docs/operators.md):
  1. every QuantizeLinear/DequantizeLinear has a constant scale and a constant zero point of 0
     (TensorRT needs build-time-constant Q scales and zero points of 0);
  2. every quantized Conv/Gemm/MatMul reads its weight through DequantizeLinear of a constant
     int8 initializer, and, in a graph whose activations are quantized (MoDiff step graph, ptq
     graph), its activation through a DequantizeLinear too;
  3. every op is in the ONNX-TensorRT parser's supported list;
  4. the graphs' inputs/outputs match manifest.json (names, dtypes, symbolic batch axis);
  5. every graph file has the digest manifest.json records (it belongs to that export).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from ..manifest import GraphTensor, Manifest, ManifestError
from .passes import constants, producers

# Ops with "Y" in onnx-tensorrt's docs/operators.md support matrix (TensorRT 8.4 table), plus
# LayerNormalization/GroupNormalization from the TensorRT 10 table. Anything else fails the check.
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GroupNormalization GRU HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
MatMul Max MaxPool Mean Min Mul Neg Not Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomUniform RandomUniformLike Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Unsqueeze Upsample Where Xor
""".split())

_DTYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT64: "int64",
           TensorProto.INT32: "int32", TensorProto.INT8: "int8"}
LINEAR_OPS = ("Conv", "Gemm", "MatMul")


@dataclass
class CheckReport:
    folder: Path
    problems: list[str] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_graph(model: onnx.ModelProto, role: str, activations_quantized: bool) -> tuple[list[str], dict]:
    """Rules 1-3 on one graph; returns (problems, counts)."""
    problems, consts, made_by = [], constants(model), producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    counts = {"quantized_linear": 0, "qdq": 0}
    for node in model.graph.node:
        where = f"{role}: node {node.name or node.output[0]} ({node.op_type})"
        if node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"{where}: op not supported by the ONNX-TensorRT parser")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            counts["qdq"] += 1
            if len(node.input) < 2 or node.input[1] not in consts:
                problems.append(f"{where}: scale is computed, not a constant")
            if len(node.input) < 3 or node.input[2] not in consts:
                problems.append(f"{where}: zero point missing or computed (TensorRT needs a constant 0)")
            elif consts[node.input[2]].any():
                problems.append(f"{where}: non-zero zero point")
        if node.op_type in LINEAR_OPS and len(node.input) >= 2:
            w = made_by.get(node.input[1])
            if w is None or w.op_type != "DequantizeLinear":
                continue  # activation x activation (attention) or a skipped full-precision layer
            counts["quantized_linear"] += 1
            if w.input[0] not in inits or inits[w.input[0]].data_type not in (TensorProto.INT8, TensorProto.INT4):
                problems.append(f"{where}: weight DequantizeLinear does not read a constant int8/int4 initializer")
            if activations_quantized:
                a = made_by.get(node.input[0])
                if a is None or a.op_type != "DequantizeLinear":
                    problems.append(f"{where}: activation input is not dequantized (expected Q/DQ before the layer)")
    return problems, counts


def onnx_io(values) -> list[GraphTensor]:
    """The I/O of an ONNX graph (model.graph.input or .output) as GraphTensors: dim_param names stay
    symbolic ("batch"), fixed dimensions are ints."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim)
        out.append(GraphTensor(v.name, _DTYPES.get(t.elem_type, str(t.elem_type)), dims))
    return out


def check_io(model: onnx.ModelProto, manifest: Manifest, role: str) -> list[str]:
    """Rule 4: the graph's I/O is exactly what the manifest says (Manifest.graph_io_problems)."""
    problems = manifest.graph_io_problems(role, onnx_io(model.graph.input), onnx_io(model.graph.output))
    return [f"{role}: {p}" for p in problems]


def check_folder(folder: str | Path) -> CheckReport:
    folder = Path(folder)
    manifest = Manifest.load(folder, verify=False)
    report = CheckReport(folder)
    try:
        manifest.verify_files(folder)  # rule 5
    except ManifestError as e:
        report.problems.append(str(e))
    mode = manifest.quant_config.mode
    for role in manifest.roles:
        path = folder / manifest.graphs[role]
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:  # onnx raises several types for damaged files
            report.problems.append(f"{role}: {path} is not a valid ONNX model ({str(e).splitlines()[0][:200]})")
            continue
        quantized_acts = (mode == "ptq") or (mode == "modiff" and role in ("step", "shallow"))
        problems, counts = check_graph(model, role, quantized_acts)
        report.problems += problems + check_io(model, manifest, role)
        report.stats[role] = {**counts, "nodes": len(model.graph.node)}
        if mode != "fp" and counts["quantized_linear"] == 0:
            report.problems.append(f"{role}: no quantized Conv/Gemm/MatMul found in a {mode} graph")
    return report
