"""Small ONNX graph rewrites applied after tracing (pure onnx + numpy).

quantize_weight_constants:  Conv/Gemm/MatMul(x, Wq float const)
                        =>  Conv/Gemm/MatMul(x, DequantizeLinear(int8 codes, scale[Cout], 0))
so every quantized Conv/Gemm/MatMul reads a DequantizeLinear of a constant int8 weight, the form
TensorRT fuses into INT8 kernels. Linear weights with block scales (QuantConfig.weight_block_size)
become INT4 initializers read by DequantizeLinear(axis=Cin axis, block_size=bs) (opset 21), the
form of TensorRT's weight-only INT4 MatMul/Gemm.
"""
from __future__ import annotations

import hashlib

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every constant tensor by name: initializers and Constant-node outputs."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: node for node in model.graph.node for o in node.output}


def _digest(a: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()


def quantize_weight_constants(model: onnx.ModelProto, layers) -> int:
    """Store each quantized layer's weight as integer codes + DequantizeLinear.

    layers: an iterable of (name, Wq, scale) or (name, Wq, scale, block_size) with Wq = codes * scale exactly
    (the reference's weight). scale is [Cout] (per output channel: int8 codes, DequantizeLinear
    on the Cout axis) or, with block_size, [Cout, Cin // block_size] for a 2-D Linear weight
    (int4 codes, DequantizeLinear with block_size on the Cin axis and a scale/zero point of the
    blocked shape: [Cin // bs, Cout] for a MatMul's [Cin, Cout] weight, [Cout, Cin // bs] for a
    Gemm's transB [Cout, Cin] weight). Tracing leaves Wq as a float constant ([Cout, ...] for
    Conv/Gemm, [Cin, Cout] when a Linear became MatMul); it is found by value, so layer and node
    names never need to agree.
    """
    lookup = _weight_lookup(layers)
    tensors = _constant_protos(model)
    graph, done, new_nodes = model.graph, 0, []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in tensors:
            continue
        if tensors[node.input[1]].data_type != onnx.TensorProto.FLOAT:
            continue
        w = numpy_helper.to_array(tensors[node.input[1]])
        hit = lookup.get((w.shape, _digest(w)))
        if hit is None:
            continue
        name, scale, block, transposed = hit
        prefix = f"{name}.weight"
        out = f"{prefix}.dequantized"
        if not any(n.output[0] == out for n in new_nodes):  # a weight read by several nodes is stored once
            wq = w.T if transposed else w  # the reference layout: [Cout, Cin, ...]
            codes, scale, zero, wname, attrs = _integer_weight(name, wq, scale, block, transposed)
            graph.initializer.extend([
                numpy_helper.from_array(codes, wname),
                numpy_helper.from_array(scale.astype(np.float32), f"{prefix}.scale"),
                numpy_helper.from_array(zero, f"{prefix}.zero_point")])
            new_nodes.append(helper.make_node("DequantizeLinear", [wname, f"{prefix}.scale", f"{prefix}.zero_point"],
                                              [out], name=f"{prefix}/DequantizeLinear", **attrs))
        node.input[1] = out
        done += 1
    # DequantizeLinear nodes of constants go first: the graph stays topologically sorted
    for n in reversed(new_nodes):
        graph.node.insert(0, n)
    return done


def _weight_lookup(layers) -> dict:
    """(shape, digest of the float bytes) -> (layer, scale, block_size, transposed) for every layer's Wq and,
    for 2-D weights, its transpose (a Linear traced as MatMul stores [Cin, Cout]). Digests keep memory at
    one weight at a time."""
    lookup = {}
    for entry in layers:
        name, wq, scale = entry[:3]
        block = entry[3] if len(entry) > 3 else None
        lookup[(wq.shape, _digest(wq))] = (name, scale, block, False)
        if wq.ndim == 2:
            lookup[(wq.shape[::-1], _digest(wq.T))] = (name, scale, block, True)
    return lookup


def _constant_protos(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every constant tensor by name, as stored (initializers and Constant-node values)."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = node.attribute[0].t
    return tensors


def _integer_weight(name: str, wq: np.ndarray, scale: np.ndarray, block: int | None, transposed: bool):
    """(codes, scale, zero point, initializer name, DequantizeLinear attributes) of one weight Wq in the
    reference layout [Cout, Cin, ...]: int8 codes per output channel (scale [Cout]), or int4 codes per block
    of `block` inputs (scale [Cout, Cin // block]); both laid out as the traced node reads the weight
    (transposed: [Cin, Cout])."""
    prefix = f"{name}.weight"
    if block is None:
        shape = [-1] + [1] * (wq.ndim - 1)
        codes = np.rint(wq / scale.reshape(shape)).astype(np.int8)  # exact: Wq = codes * scale
        if transposed:
            codes = np.ascontiguousarray(codes.T)
        return codes, scale, np.zeros(scale.shape, np.int8), f"{prefix}.int8", {"axis": 1 if transposed else 0}
    fits = wq.ndim == 2 and scale.ndim == 2 and scale.shape[0] == wq.shape[0]
    if not fits or scale.shape[1] * block != wq.shape[1]:
        raise ValueError(f"{name}: block scale {scale.shape} does not fit weight {wq.shape} "
                         f"with block size {block}")
    codes = np.rint(wq / np.repeat(scale, block, axis=1))
    if codes.min() < -8 or codes.max() > 7:
        raise ValueError(f"{name}: weight codes outside the int4 range [-8, 7]")
    codes = codes.astype(np.int8)
    if transposed:  # MatMul weight [Cin, Cout]: blocks run along axis 0
        codes, scale = np.ascontiguousarray(codes.T), np.ascontiguousarray(scale.T)
    attrs = {"axis": 0 if transposed else 1, "block_size": int(block)}
    return codes.astype(ml_dtypes.int4), scale, np.zeros(scale.shape, ml_dtypes.int4), f"{prefix}.int4", attrs


def remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads, then initializers nobody reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {n for node in graph.node for n in node.input} | outputs
        dead = [node for node in graph.node if not any(o in used for o in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {n for node in graph.node for n in node.input} | outputs
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def set_io_shapes(model: onnx.ModelProto, shapes: dict[str, list]) -> None:
    """Pin every named graph input/output to its manifest shape ("batch" stays symbolic)."""
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for d in shapes[value.name]:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = int(d)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference of `model` that also works past protobuf's 2 GiB (a full-precision PixArt-alpha is
    2.4 GB): inferred on a light copy in which every initializer over 64 KiB stands as a typed graph input
    (shape inference reads only their types and shapes). Returns the light copy with value_info filled."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    listed = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.ByteSize() <= 1 << 16:
            g.initializer.append(t)
        elif t.name not in listed:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return onnx.shape_inference.infer_shapes(light)


def fold_constant_mods(model: onnx.ModelProto) -> int:
    """Replace every Mod of two constants by its value. The TorchScript exporter writes `unflatten(-1, ...)`
    (FLUX's attention heads, diffusers' FluxAttnProcessor) as Mod(-1, rank) on constants and does not fold it;
    ONNX-TensorRT has no Mod (its support matrix), so the check would refuse the graph. Returns the number."""
    consts = constants(model)
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Mod" or not all(x in consts for x in node.input):
            continue
        a, b = (consts[x] for x in node.input)
        fmod = next((att.i for att in node.attribute if att.name == "fmod"), 0)
        value = np.fmod(a, b) if fmod else np.mod(a, b)
        const = onnx.helper.make_node("Constant", [], list(node.output), name=node.name,
                                      value=numpy_helper.from_array(np.asarray(value, dtype=a.dtype)))
        idx = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(idx, const)
        folded += 1
    return folded


def fold_static_squeezes(model: onnx.ModelProto) -> int:
    """Replace by Identity every `If` the TorchScript exporter emits for `x.squeeze(d)` on a tensor whose
    size at d it did not know: then-branch Squeeze(x, d), else-branch Identity(x), condition
    Equal(Gather(Shape(x), d), 1). When the graph's shapes (set_io_shapes, then shape inference) give
    x's dimension d as a number other than 1, the squeeze is a no-op. (PixArt's `proj_out(...).squeeze(1)`
    on the step graph's cache sum: the checker's strict inference rejects the Squeeze branch.)
    Returns the number folded."""
    shapes = {}
    inferred = infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    consts = constants(model)
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "If":
            continue
        br = {a.name: a.g for a in node.attribute}
        then, other = br.get("then_branch"), br.get("else_branch")
        if then is None or other is None or [n.op_type for n in other.node] != ["Identity"]:
            continue
        sq = [n for n in then.node if n.op_type == "Squeeze"]
        x = other.node[0].input[0]
        if len(sq) != 1 or sq[0].input[0] != x:
            continue
        axes = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in then.node if n.op_type == "Constant"}
        axis = axes.get(sq[0].input[1]) if len(sq[0].input) > 1 else None
        if axis is None:
            axis = consts.get(sq[0].input[1]) if len(sq[0].input) > 1 else None
        shape = shapes.get(x)
        if axis is None or axis.size != 1 or shape is None or int(axis.reshape(-1)[0]) >= len(shape):
            continue
        dim = shape[int(axis.reshape(-1)[0])]
        if dim is None or dim == 1:
            continue
        idx = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(idx, helper.make_node("Identity", [x], [node.output[0]], name=node.name + "_folded"))
        folded += 1
    return folded


def fold_weight_dequant(model: onnx.ModelProto, keep: set[str] = frozenset()) -> int:
    """Replace every DequantizeLinear of a constant (the int8/int4 weight codes) by its float result
    ((codes - zp) * scale in float32, what the node computes: bit-exact), so a runtime runs those layers
    with float weights instead of fusing them into integer kernels. Activation quantizers stay: the codes
    are those of the graph. Used by the `--target ort` "fold" variant (ORT's float kernels are faster on
    CPU) and, at load, by the OpenVINO and ONNX Runtime runners on CPUs without VNNI/AMX (their int8 dot
    product saturates: backends/cpu.py). Returns the number of weights folded. Needs the weights loaded
    (onnx.load with external data). `keep`: output names of layers whose weights stay quantized (the
    OpenVINO runner's u8 layers, export/ov_variant.unsigned_layers)."""
    consts = {t.name: t for t in model.graph.initializer}
    kept = {i for n in model.graph.node if n.output and n.output[0] in keep for i in n.input}
    folded = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in consts or node.input[1] not in consts:
            continue
        if node.output[0] in kept:
            continue
        x = numpy_helper.to_array(consts[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(consts[node.input[1]]).astype(np.float32)
        zp = (numpy_helper.to_array(consts[node.input[2]]).astype(np.float32)
              if len(node.input) > 2 and node.input[2] in consts else np.zeros_like(scale))
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = attrs.get("axis", 1) % max(x.ndim, 1)
        if attrs.get("block_size"):  # blocked (INT4) scales: one per block_size elements along axis
            n, bs = x.shape[axis], attrs["block_size"]
            scale, zp = (np.repeat(t, bs, axis=axis).take(range(n), axis=axis) for t in (scale, zp))
        elif scale.ndim == 1 and scale.size > 1:  # per channel along axis
            shape = [1] * x.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        # named `<dq output>.folded` (export/weights.baked_weights reads a variant's folded weights by that name)
        w = numpy_helper.from_array(((x - zp) * scale).astype(np.float32), f"{node.output[0]}.folded")
        folded.append((node, w))
    rename = {node.output[0]: tensor.name for node, tensor in folded}
    for node, tensor in folded:
        model.graph.node.remove(node)
        model.graph.initializer.append(tensor)
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            node.input[k] = rename.get(name, name)
    for out in model.graph.output:  # a folded weight that is also a graph output keeps its name
        if out.name in rename:
            model.graph.node.append(helper.make_node("Identity", [rename[out.name]], [out.name]))
    remove_unused(model)
    return len(folded)
