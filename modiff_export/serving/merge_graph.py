"""One ONNX graph for a stateful Triton model: prime or step, chosen per sample by a `start` input.

Triton's implicit state keeps every cache of a sequence inside the server and feeds the previous
request's output state back as the next request's input state, within ONE model. MoDiff's first call
(prime: full precision, fills the caches) and later calls (step: consume and replace them) are two
graphs, so they are merged here:

    inputs   sample [B, C, H, W], timestep [B], (encoder_hidden_states [B, S, D]),
             start [B, 1] int32 (Triton's CONTROL_SEQUENCE_START), every cache input (the state)
    outputs  noise_pred, every cache output (the next state)

    If(any(start)):  then: prime and step both run, Where(start, prime, step) per sample and per tensor
                     else: step only (the common case: one start per trajectory)

Per-sample scales make every sample's result independent of the others in the batch, so a batch
mixing starting and running sequences is exact. Prime and step weights that are byte-identical are
stored once (they are: both graphs carry the same int8 weights).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModiffExportError
from ..manifest import Manifest

START = "start"


class MergeError(ModiffExportError):
    pass


def _rename_graph(graph: onnx.GraphProto, prefix: str, keep: set[str], init_names: dict[str, str]):
    """Nodes of `graph` with every value renamed `prefix + name`, except graph inputs in `keep` and
    initializers (mapped through `init_names`). Returns (nodes, output name map)."""
    mapping = dict(init_names)
    for name in keep:
        mapping[name] = name
    nodes = []
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise MergeError(f"node {node.name} ({node.op_type}) has a subgraph; merging such graphs is not supported")
        new = onnx.NodeProto()
        new.CopyFrom(node)
        new.name = prefix + node.name
        del new.input[:]
        del new.output[:]
        new.input.extend(mapping.get(i, prefix + i) if i else "" for i in node.input)
        for o in node.output:
            mapping[o] = prefix + o if o else ""
        new.output.extend(mapping[o] for o in node.output)
        nodes.append(new)
    return nodes, mapping


def _value_info(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, [d if isinstance(d, int) else "batch" for d in shape])


def merged_unet_model(folder: str | Path) -> onnx.ModelProto:
    """The one graph of an exported folder's prime + step graphs, chosen per sample by `start` (module
    docstring). Raises MergeError for folders a Triton sequence model cannot serve."""
    folder = Path(folder)
    m = Manifest.load(folder)
    _check_mergeable(folder, m)
    prime = onnx.load(str(folder / m.graphs["prime"]))
    step = onnx.load(str(folder / m.graphs["step"]))
    shared = [s.name for s in m.inputs]
    cache_in = [c.input for c in m.caches]
    outs = [s.name for s in m.graph_outputs("step")]
    specs = {s.name: s for s in m.graph_outputs("step")}
    inits, names = _shared_initializers(prime.graph, step.graph)
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in list(step.graph.output) + list(step.graph.input)}

    def branch(name: str, with_prime: bool) -> onnx.GraphProto:
        """The If branch: step only (else), or prime and step selected per sample by Where (then)."""
        nodes, step_map = _rename_graph(step.graph, f"{name}/step/", set(shared + cache_in), names["step"])
        results = {o: step_map[o] for o in outs}
        if with_prime:
            p_nodes, p_map = _rename_graph(prime.graph, f"{name}/prime/", set(shared), names["prime"])
            nodes = p_nodes + nodes
            for o in outs:
                rank = len(specs[o].shape)
                sel = f"{name}/sel/{o}"
                nodes.append(helper.make_node("Where", [f"start_mask_{rank}", p_map[o], step_map[o]], [sel], name=sel))
                results[o] = sel
        outputs = [_value_info(results[o], elem[o], specs[o].shape) for o in outs]
        return helper.make_graph(nodes, name, [], outputs)

    head = _start_masks(sorted({len(specs[o].shape) for o in outs}), inits)
    if_node = helper.make_node("If", ["start_any"], outs, name="prime_or_step",
                               then_branch=branch("then", True), else_branch=branch("else", False))
    g_inputs = [vi for vi in step.graph.input if vi.name in shared]
    g_inputs.append(helper.make_tensor_value_info(START, TensorProto.INT32, ["batch", 1]))
    g_inputs += [vi for vi in step.graph.input if vi.name in cache_in]
    g_outputs = [vi for o in outs for vi in step.graph.output if vi.name == o]
    graph = helper.make_graph(head + [if_node], "modiff_unet", g_inputs, g_outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=list(step.opset_import),
                              producer_name="modiff-export package-triton")
    model.ir_version = step.ir_version
    return model


def _check_mergeable(folder: Path, m: Manifest) -> None:
    if m.reuse is not None:
        raise MergeError(f"{folder}: block reuse (shallow.onnx) needs the runner's prime/step/shallow schedule and "
                         f"Triton's START flag selects only prime or step; serve this folder with `cli.py serve`")
    if not m.caches:
        raise MergeError(f"{folder}: no caches (fp/ptq export): serve prime.onnx as a stateless model instead")
    if m.step_extra_inputs:
        raise MergeError(f"{folder}: static scales with several timestep buckets feed a delta_scales input per call; "
                         "a Triton sequence model cannot (re-export with --scale-mode dynamic or one bucket)")
    if m.quant_config.keyframe_interval:
        raise MergeError(f"{folder}: keyframe_interval re-primes mid-trajectory; Triton's START flag only "
                         f"primes at the start")


def _shared_initializers(prime: onnx.GraphProto, step: onnx.GraphProto) -> tuple[list, dict]:
    """One copy per distinct tensor (prime and step share their weights): (initializers named
    "w<i>/<first name>", {"prime"|"step": {old name: new name}})."""
    by_hash, inits, names = {}, [], {"prime": {}, "step": {}}
    for role, g in (("prime", prime), ("step", step)):
        for t in g.initializer:
            anon = onnx.TensorProto()
            anon.CopyFrom(t)
            anon.name = ""
            key = hashlib.sha256(anon.SerializeToString()).hexdigest()
            if key not in by_hash:
                new = onnx.TensorProto()
                new.CopyFrom(t)
                new.name = f"w{len(inits)}/{t.name}"
                by_hash[key] = new.name
                inits.append(new)
            names[role][t.name] = by_hash[key]
    return inits, names


def _start_masks(ranks: list[int], inits: list) -> list[onnx.NodeProto]:
    """start [B, 1] int32 -> start_any (bool scalar: the If condition) and start_mask_<r> [B, 1, ..., 1]
    (bool, rank r) for each output rank, to broadcast in Where; the reshape targets are appended to
    `inits`."""
    head = [helper.make_node("Cast", [START], ["start_bool"], to=TensorProto.BOOL, name="start_bool"),
            helper.make_node("ReduceMax", [START], ["start_any_i"], keepdims=0, name="start_any_i"),
            helper.make_node("Cast", ["start_any_i"], ["start_any"], to=TensorProto.BOOL, name="start_any")]
    for r in ranks:
        shape_name = f"mask_shape_{r}"
        inits.append(numpy_helper.from_array(np.array([-1] + [1] * (r - 1), dtype=np.int64), shape_name))
        head.append(helper.make_node("Reshape", ["start_bool", shape_name], [f"start_mask_{r}"],
                                     name=f"start_mask_{r}"))
    return head
