"""The ONNX Runtime (CPU) variant of an exported graph: integer Conv/MatMul instead of Q/DQ + float.

The exported (TensorRT-shaped) graphs compute every quantized layer as

    codes = QuantizeLinear(u, scale=1, zp=0)            # int8 activation codes (exact integers)
    y     = Conv|MatMul|Gemm(DequantizeLinear(codes, 1, 0), DequantizeLinear(W int8, w_scale[Cout], 0))
    out   = y * s (...)

TensorRT fuses that into an INT8 kernel; ONNX Runtime's CPU kernels do not (no output Q), so they
dequantize both sides and run a float Conv. This pass rewrites each such layer into

    y = Mul(Cast<float>(ConvInteger|MatMulInteger(codes, W int8)), w_scale)   (+ Add(bias) if any)

The integer product is exact (int32 accumulation of int8 x int8); the float result differs from the
Q/DQ graph only by float rounding (one per-channel multiply instead of a float sum of float
products). ORT fuses MatMulInteger -> Cast -> Mul into MatMulIntegerToFloat. The unit-scale
DequantizeLinear stays where other nodes (the a_hat update) still read it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..manifest import Manifest
from .passes import constants, fold_weight_dequant, infer_shapes, producers, remove_unused


def _is_unit_qdq(node, consts) -> bool:
    """QuantizeLinear/DequantizeLinear with scale 1 and an int8 zero point of 0 (constants)."""
    if len(node.input) < 3:
        return False
    s, zp = consts.get(node.input[1]), consts.get(node.input[2])
    return (s is not None and zp is not None and s.size == 1 and float(s.reshape(-1)[0]) == 1.0
            and zp.dtype == np.int8 and zp.size == 1 and int(zp.reshape(-1)[0]) == 0)


def _weight_dq(node, consts):
    """(int8 codes, per-channel scale, axis) when `node` dequantizes a constant int8 weight with zp 0."""
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 2:
        return None
    w, s = consts.get(node.input[0]), consts.get(node.input[1])
    zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if w is None or s is None or w.dtype != np.int8 or (zp is not None and np.any(zp != 0)):
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return w, s.astype(np.float32).reshape(-1), axis


def rewrite_integer_ops(model: onnx.ModelProto) -> int:
    """Rewrite every unit-scale-Q/DQ x int8-weight Conv/MatMul/Gemm in place; returns how many."""
    graph = model.graph
    consts, prods = constants(model), producers(model)
    replaced: dict[int, list] = {}  # id(old node) -> new nodes
    init = []
    for node in graph.node:
        match = _integer_layer(node, consts, prods)
        built = None if match is None else _integer_nodes(node, *match, consts)
        if built is not None:
            replaced[id(node)] = built[0]
            init += built[1]
    if not replaced:
        return 0
    nodes = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(init)
    remove_unused(model)
    return len(replaced)


def _integer_layer(node, consts, prods):
    """(codes QuantizeLinear, int8 weight codes, w_scale, axis) when `node` is a Conv/MatMul/Gemm reading
    DequantizeLinear(QuantizeLinear(u, 1, 0), 1, 0) and a dequantized constant int8 weight, else None."""
    if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
        return None
    dq = prods.get(node.input[0])
    if dq is None or dq.op_type != "DequantizeLinear" or not _is_unit_qdq(dq, consts):
        return None
    q = prods.get(dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or not _is_unit_qdq(q, consts):
        return None
    wdq = _weight_dq(prods.get(node.input[1]), consts)
    return None if wdq is None else (q, *wdq)


def _integer_nodes(node, q, codes, w_scale, axis, consts):
    """(new nodes, new initializers) computing `node` as Mul(Cast<float>(ConvInteger|MatMulInteger(codes_x,
    W int8)), w_scale) (+ bias), or None where the layer's form is not supported (left as it is)."""
    attrs = {a.name: a for a in node.attribute}
    p = node.name or node.output[0]
    core = (_conv_integer if node.op_type == "Conv" else _matmul_integer)(node, attrs, q, codes, w_scale, axis, p)
    if core is None:
        return None
    new, init, scale_shape, bias = core
    sname = f"{p}.w_scale"
    init.append(numpy_helper.from_array(w_scale.reshape(scale_shape) if w_scale.size > 1 else w_scale.reshape([]),
                                        sname))
    new.append(helper.make_node("Cast", [f"{p}.acc"], [f"{p}.accf"], name=f"{p}/Cast", to=TensorProto.FLOAT))
    out = node.output[0]
    if bias is None:
        new.append(helper.make_node("Mul", [f"{p}.accf", sname], [out], name=f"{p}/Mul"))
        return new, init
    if node.op_type == "Conv":  # Conv's bias is [Cout]; the rescaled accumulator is [B, Cout, H, W]
        init.append(numpy_helper.from_array(consts[bias].reshape(1, -1, 1, 1).astype(np.float32), f"{p}.bias4d"))
        bias = f"{p}.bias4d"
    new.append(helper.make_node("Mul", [f"{p}.accf", sname], [f"{p}.scaled"], name=f"{p}/Mul"))
    new.append(helper.make_node("Add", [f"{p}.scaled", bias], [out], name=f"{p}/AddBias"))
    return new, init


def _conv_integer(node, attrs, q, codes, w_scale, axis, p):
    """ConvInteger(codes_x, W [Cout, Cin, kH, kW] int8) -> int32 [B, Cout, H, W]; per-Cout scale only."""
    if axis != 0 or w_scale.size not in (1, codes.shape[0]):
        return None
    wname = f"{p}.w_int8"
    new = [helper.make_node("ConvInteger", [q.output[0], wname], [f"{p}.acc"], name=f"{p}/ConvInteger",
                            **{k: helper.get_attribute_value(a) for k, a in attrs.items()})]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    return new, [numpy_helper.from_array(codes, wname)], [1, -1, 1, 1], bias


def _matmul_integer(node, attrs, q, codes, w_scale, axis, p):
    """MatMulInteger(codes_x [..., Cin], W [Cin, Cout] int8) -> int32 [..., Cout]. A Gemm becomes one only
    with alpha = beta = 1 and no transA (transB: the stored [Cout, Cin] weight is transposed here)."""
    trans_b = (node.op_type == "Gemm" and helper.get_attribute_value(attrs["transB"])
               if "transB" in attrs else False)
    bias = None
    if node.op_type == "Gemm":
        alpha = helper.get_attribute_value(attrs["alpha"]) if "alpha" in attrs else 1.0
        beta = helper.get_attribute_value(attrs["beta"]) if "beta" in attrs else 1.0
        trans_a = helper.get_attribute_value(attrs["transA"]) if "transA" in attrs else 0
        if alpha != 1.0 or beta != 1.0 or trans_a:
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out_axis = 0 if trans_b else 1  # the Cout axis of the stored weight
    if w_scale.size != 1 and axis != out_axis:
        return None
    w = np.ascontiguousarray(codes.T) if trans_b else codes
    wname = f"{p}.w_int8"
    new = [helper.make_node("MatMulInteger", [q.output[0], wname], [f"{p}.acc"], name=f"{p}/MatMulInteger")]
    return new, [numpy_helper.from_array(w, wname)], [-1], bias


def remove_noop_casts(model: onnx.ModelProto) -> int:
    """Drop every Cast whose input already has the target type (the exporter casts each cache input
    and output to the manifest's dtype; for float32 caches those are copies): readers of a dropped
    Cast read its input; a Cast that writes a graph output hands that name to its producer. Exact
    (no value changes). Types come from ONNX shape inference; graphs it cannot handle (> 2 GB) are
    left alone. Returns how many Casts were removed."""
    graph = model.graph
    try:
        inferred = infer_shapes(model)
    except Exception:  # noqa: BLE001 - an optimization only
        return 0
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in graph.initializer})
    outs = {o.name for o in graph.output}
    prods = producers(model)
    rename, drop, handed = {}, set(), set()

    def resolve(name):
        while name in rename:
            name = rename[name]
        return name

    for node in graph.node:
        if node.op_type != "Cast":
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        src_name = resolve(node.input[0])
        if types.get(node.input[0]) != to:
            continue
        out = node.output[0]
        if out not in outs:
            rename[out] = src_name
        else:  # its producer writes the graph output under the Cast's name
            src = prods.get(src_name)
            if src is None or id(src) in drop or src_name in outs or src_name in handed:
                continue
            src.output[list(src.output).index(src_name)] = out
            handed.add(src_name)
            rename[src_name] = out
        drop.add(id(node))
    if not drop:
        return 0

    nodes = [n for n in graph.node if id(n) not in drop]
    for n in nodes:
        for k, name in enumerate(n.input):
            n.input[k] = resolve(name)
    del graph.node[:]
    graph.node.extend(nodes)
    remove_unused(model)
    return len(drop)


METHODS = ("fold", "integer")


def rewrite(model: onnx.ModelProto, method: str = "fold") -> int:
    """method "fold": float weights (fast on ORT CPU, see passes.fold_weight_dequant); "integer":
    ConvInteger/MatMulInteger for quantized-activation layers (rewrite_integer_ops). Both then drop
    the no-op Casts (remove_noop_casts). Returns the number of layers rewritten."""
    if method not in METHODS:
        raise ValueError(f"ort variant method {method!r}; expected one of {list(METHODS)}")
    n = fold_weight_dequant(model) if method == "fold" else rewrite_integer_ops(model)
    if n:
        remove_noop_casts(model)
    return n


def apply_to_folder(folder: str | Path, manifest: Manifest, method: str = "fold") -> Manifest:
    """Rewrite the graphs of a folder being exported (each via a temp file + rename) and return its
    manifest with target "ort" and what was rewritten (variant = {"method", "rewritten_layers"})."""
    folder = Path(folder)
    done = {}
    for role in manifest.roles:
        name = manifest.graphs[role]
        path = folder / name
        model = onnx.load(str(path))
        n = rewrite(model, method)
        done[name] = n
        if n:
            tmp = path.with_name(f".{path.name}.tmp")
            if model.ByteSize() > 2 * 1024**3 - 64 * 1024**2:
                onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                                location=path.name + ".data", size_threshold=1024)
            else:
                onnx.save_model(model, str(tmp))
            onnx.checker.check_model(str(tmp))
            os.replace(tmp, path)
    return manifest.replace(target="ort", variant={"method": method, "rewritten_layers": done})


def write_variant(src: str | Path, out: str | Path, method: str = "fold", overwrite: bool = False) -> Manifest:
    """The `--target ort` variant of an exported folder, written as a new folder `out` (atomically)."""
    import shutil

    from ..fsutil import atomic_folder

    manifest = Manifest.load(src)
    with atomic_folder(out, overwrite) as tmp:
        for name in manifest.graph_files(src):
            shutil.copyfile(Path(src) / name, tmp / name)
        manifest = apply_to_folder(tmp, manifest, method).with_digests(tmp)
        manifest.write(tmp)
    return manifest
