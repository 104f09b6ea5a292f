"""The OpenVINO (CPU) form of an exported step graph: the same codes, fewer element-wise passes.

The exported step graph computes every quantized layer with dynamic per-sample scales as

    d = x - a_hat;  s = Clip(ReduceMax(Abs(d)) / qmax, 1e-8)          # [B, 1, ...]
    c = DQ(Q(Clip(d / s, -qmax-1, qmax)))                               # unit-scale int8 codes
    o_hat' = o_hat + Conv|MatMul(c, W) * s;  a_hat' = a_hat + c * s

OpenVINO's CPU plugin turns the Q/DQ pair + Conv into an int8 convolution, but runs the rest as
separate memory-bound passes (Abs writes a full tensor; the a_hat update first dequantizes the int8
codes into a float tensor, then adds). `rewrite` changes, per layer (each lever on its own flag):

    minmax   absmax = Max(ReduceMax(d), -ReduceMin(d)): two reductions of d, no Abs tensor (exact)
    recip    u = d * (1 / s) instead of d / s (differs by at most 1 ulp: codes change only at ties)
    update   a_hat' = a_hat + (Round(Clip(d * (1 / s)) + 128) - 128) * s from floats, one fused pass,
             instead of first dequantizing the int8 codes into a float tensor. The +128 shift rounds as
             the CPU plugin's int8 quantization of the conv input does (u8 with zero point 128, rounded
             after the shift), so the update applies exactly the codes the convolution saw (a plain
             Round disagrees with it near ties: measured 1.2x the quantization error on a tiny UNet)
    share    layers reading the same tensor with the same quantizer constants (to_q/to_k/to_v, the
             resnets' time-embedding projections) compute d, s and the codes once: their a_hat caches
             are equal by construction (same prime value, same updates), so the others' cache outputs
             are the first layer's; with block reuse only within the deep or the outer layers

    u8       codes |c| <= 63 (activations of up to 7 bits) are quantized as uint8 around zero point qmax + 1
             instead of int8 around 0: the same codes (DQ subtracts the zero point again), but the CPU
             plugin's u8 input then holds values 0..2 qmax + 1 instead of 128 +- qmax, so on CPUs without
             VNNI/AMX the int8 dot product (u8 x s8 pairs summed in int16: 2 x 127 x 128 < 2^15) cannot
             saturate and those layers keep int8 kernels (backends/cpu.py); the update lever shifts by the
             same zero point

Graph I/O, names and shapes are unchanged (the manifest's contract); only the inside differs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .passes import constants, producers, remove_unused

LEVERS = ("minmax", "recip", "update", "share", "u8")
U8_MAX_CODE = 63  # largest |code| the u8 lever takes: u8 values 0..127, so 2 x 127 x 128 < 2^15


def _consumers(model) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _only(cons, name, op):
    nodes = [n for n in cons.get(name, []) if n.op_type == op]
    return nodes[0] if len(nodes) == 1 else None


def find_layers(model) -> list[dict]:
    """Every quantized layer of a dynamic-scale step graph, as {role: node} (the module docstring's
    pattern); layers of another form (static scales) are not listed."""
    cons = _consumers(model)
    layers = []
    for sub in model.graph.node:
        if sub.op_type != "Sub" or not sub.input[1].startswith("cache_in.") or not sub.input[1].endswith(".a_hat"):
            continue
        d = sub.output[0]
        L = {"sub": sub, "abs": _only(cons, d, "Abs"), "div_u": _only(cons, d, "Div")}
        if L["abs"] is None or L["div_u"] is None:
            continue
        L["rmax"] = _only(cons, L["abs"].output[0], "ReduceMax")
        L["div_q"] = L["rmax"] and _only(cons, L["rmax"].output[0], "Div")
        L["clip_s"] = L["div_q"] and _only(cons, L["div_q"].output[0], "Clip")
        if not L["clip_s"] or L["div_u"].input[1] != L["clip_s"].output[0]:
            continue
        nxt = cons.get(L["div_u"].output[0], [])
        L["clip_u"] = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "Clip" else None
        after = L["clip_u"].output[0] if L["clip_u"] else L["div_u"].output[0]
        L["q"] = _only(cons, after, "QuantizeLinear")
        L["dq"] = L["q"] and _only(cons, L["q"].output[0], "DequantizeLinear")
        if not L["dq"]:
            continue
        c = cons.get(L["dq"].output[0], [])
        L["mul_c"] = next((n for n in c if n.op_type == "Mul"), None)
        L["op"] = next((n for n in c if n.op_type in ("Conv", "MatMul", "Gemm")), None)
        add_a = L["mul_c"] and _only(cons, L["mul_c"].output[0], "Add")
        if L["op"] is None or add_a is None or sub.input[1] not in add_a.input:
            continue
        L["add_a"], L["s"], L["d"] = add_a, L["clip_s"].output[0], d
        layers.append(L)
    return layers


def _key(L, consts, groups) -> tuple:
    """What decides a layer's codes besides its input: the reduction axes, every constant, and the group
    of its a_hat cache (layers whose a_hat caches advance on different calls never share)."""
    def val(name):
        return None if not name else (consts[name].tobytes() if name in consts else name)

    nodes = [L["rmax"], L["div_q"], L["clip_s"], L["clip_u"], L["q"], L["dq"]]
    attrs = tuple((a.name, str(helper.get_attribute_value(a))) for a in L["rmax"].attribute)
    return (L["sub"].input[0], groups.get(L["sub"].input[1]), attrs,
            tuple(val(i) for n in nodes if n is not None for i in n.input[1:]))


def _code_bound(L, consts) -> int | None:
    """qmax of a layer whose codes are Clip(u, -qmax - 1, qmax) -> QuantizeLinear(u, 1, int8 0) (constants)."""
    clip, q = L["clip_u"], L["q"]
    if clip is None or len(clip.input) < 3 or len(q.input) < 3:
        return None
    lo, hi, scale, zp = (consts.get(n) for n in (clip.input[1], clip.input[2], q.input[1], q.input[2]))
    if any(v is None or v.size != 1 for v in (lo, hi, scale, zp)) or zp.dtype != np.int8:
        return None
    lo, hi = float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0])
    if float(scale.reshape(-1)[0]) != 1.0 or int(zp.reshape(-1)[0]) != 0 or hi != int(hi) or lo != -hi - 1:
        return None
    return int(hi)


def unsigned_layers(model: onnx.ModelProto) -> set[str]:
    """Output names of the Conv/MatMul/Gemm nodes whose input codes the u8 lever made unsigned (a
    DequantizeLinear with a uint8 zero point feeds them): the layers that keep int8 kernels on CPUs whose
    int8 dot product saturates; the runner folds every other weight there."""
    consts, prods = constants(model), producers(model)
    out = set()
    for node in model.graph.node:
        dq = prods.get(node.input[0]) if node.op_type in ("Conv", "MatMul", "Gemm") else None
        if dq is not None and dq.op_type == "DequantizeLinear" and len(dq.input) > 2:
            zp = consts.get(dq.input[2])
            if zp is not None and zp.dtype == np.uint8:
                out.add(node.output[0])
    return out


def rewrite(model: onnx.ModelProto, levers=LEVERS, groups: dict[str, str] | None = None) -> int:
    """Apply `levers` (a subset of LEVERS) to every dynamic-scale layer in place; returns how many
    layers were rewritten. `groups` {a_hat cache input name: group}: "share" only within a group (block
    reuse: the deep layers' a_hat caches skip the shallow calls, the outer layers' do not)."""
    bad = set(levers) - set(LEVERS)
    if bad:
        raise ValueError(f"unknown levers {sorted(bad)}; expected a subset of {list(LEVERS)}")
    layers = find_layers(model)
    if not layers:
        return 0
    consts, graph = constants(model), model.graph
    new_nodes: dict[int, list] = {}  # id(anchor node) -> nodes inserted right after it
    rename: dict[str, str] = {}      # tensor -> tensor that replaces it for its readers
    drop: set[int] = set()
    first: dict[tuple, dict] = {}
    for i, L in enumerate(layers):
        p = f"ov{i}"
        if "share" in levers:
            k = _key(L, consts, groups or {})
            if k in first:  # same input, same quantizer: reuse the first layer's codes and a_hat
                F = first[k]
                L["op"].input[0] = F["dq"].output[0]
                for node in graph.node:
                    if node.op_type == "Mul" and L["op"].output[0] in node.input and L["s"] in node.input:
                        node.input[list(node.input).index(L["s"])] = F["s"]
                a_out = L["add_a"].output[0]
                new_nodes.setdefault(id(F["add_a"]), []).append(
                    helper.make_node("Identity", [F["add_a"].output[0]], [a_out], name=f"{p}/shared_a_hat"))
                drop.add(id(L["add_a"]))
                continue
            first[k] = L
        d, s = L["d"], L["s"]
        shift = 128.0  # the CPU plugin's u8 zero point for int8 codes around 0
        if "u8" in levers and (q := _code_bound(L, consts)) is not None and q <= U8_MAX_CODE:
            zp = f"ov.u8_zero_point_{q + 1}"
            if zp not in consts:
                graph.initializer.append(numpy_helper.from_array(np.array(q + 1, np.uint8), zp))
                consts[zp] = np.array(q + 1, np.uint8)
            for node in (L["q"], L["dq"]):
                node.input[2] = zp
            shift = float(q + 1)
        if "minmax" in levers:
            rmax = L["rmax"]
            axes = [a for a in rmax.attribute]
            mn = helper.make_node("ReduceMin", [d], [f"{p}.dmin"], name=f"{p}/ReduceMin")
            mx = helper.make_node("ReduceMax", [d], [f"{p}.dmax"], name=f"{p}/ReduceMax")
            mn.attribute.extend(axes)
            mx.attribute.extend(axes)
            neg = helper.make_node("Neg", [f"{p}.dmin"], [f"{p}.ndmin"], name=f"{p}/Neg")
            amax = helper.make_node("Max", [f"{p}.dmax", f"{p}.ndmin"], [rmax.output[0]], name=f"{p}/Max")
            new_nodes.setdefault(id(rmax), []).extend([mn, mx, neg, amax])
            drop.update({id(rmax), id(L["abs"])})
        if "recip" in levers or "update" in levers:
            r = f"{p}.inv_s"
            one = f"{p}.one"
            graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
            new_nodes.setdefault(id(L["clip_s"]), []).append(helper.make_node("Div", [one, s], [r], name=f"{p}/Recip"))
        if "recip" in levers:
            du = L["div_u"]
            du.op_type = "Mul"
            du.input[1] = r
        if "update" in levers:
            # its own d * r chain, so OpenVINO fuses it into one pass (a_hat, d -> a_hat') instead of
            # sharing the conv branch's tensors; the operands are swapped (r * d) so that no pass merges
            # it back with the conv branch's d * r
            u2 = [helper.make_node("Mul" if "recip" in levers else "Div",
                                   [r, d] if "recip" in levers else [d, s], [f"{p}.u2"], name=f"{p}/U2")]
            last = f"{p}.u2"
            if L["clip_u"] is not None:
                cu = L["clip_u"]
                u2.append(helper.make_node("Clip", [last, *cu.input[1:]], [f"{p}.u2c"], name=f"{p}/Clip2"))
                last = f"{p}.u2c"
            a_in = L["sub"].input[1]
            # round as the CPU plugin's int8 quantization does: round(u + zp) - zp (u8 with zero point zp: 128, or
            # the u8 lever's)
            off = f"{p}.off{int(shift)}"
            graph.initializer.append(numpy_helper.from_array(np.array(shift, np.float32), off))
            u2 += [helper.make_node("Add", [last, off], [f"{p}.u8"], name=f"{p}/Shift"),
                   helper.make_node("Round", [f"{p}.u8"], [f"{p}.r8"], name=f"{p}/Round"),
                   helper.make_node("Sub", [f"{p}.r8", off], [f"{p}.codes"], name=f"{p}/Unshift"),
                   helper.make_node("Mul", [f"{p}.codes", s], [f"{p}.qs"], name=f"{p}/MulS"),
                   helper.make_node("Add", [a_in, f"{p}.qs"], [L["add_a"].output[0]], name=f"{p}/UpdateA")]
            new_nodes.setdefault(id(L["add_a"]), []).extend(u2)
            drop.add(id(L["add_a"]))
    nodes = []
    for node in graph.node:
        if id(node) not in drop:
            nodes.append(node)
        nodes.extend(new_nodes.get(id(node), []))
    for n in nodes:
        for k, name in enumerate(n.input):
            n.input[k] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(_toposort(nodes, model))
    remove_unused(model)
    return len(layers)


def _toposort(nodes, model) -> list:
    """Nodes in an order where every input is produced before it is read (inserted nodes may read
    tensors produced later in the original order, e.g. a shared layer's codes)."""
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("ov_variant: the rewritten graph has a cycle or a dangling input")
        pending = rest
    return out
