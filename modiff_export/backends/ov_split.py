"""Block reuse with stateful caches on OpenVINO: the step graph cut into three models at the deep branch.

OpenVINO variables (stateful caches, 1.2-1.4x faster than explicit cache I/O on the CIFAR-size step:
docs/speed.md) belong to one compiled model, but with block reuse (docs/design.md section 1.1) two graphs,
step and shallow, share the outer layers' caches. So the runner does not compile the shallow graph: it cuts
the step graph (an ov.Model, after export/ov_variant.py's rewrite) into

    outer_in    what the deep branch needs and what the outer blocks compute before it (conv_in, the time
                embedding, the outer down blocks), with those layers' caches
    deep        the deep branch, with its layers' caches; its output is the reuse feature
    outer_out   the outer up blocks and conv_out, reading the feature

A step runs the three parts, a shallow call outer_in and outer_out with the feature the last full call left:
what the exported shallow graph computes. Every cache belongs to exactly one part (MakeStateful per part);
the tensors crossing parts ("links": skip connections, the time embedding, the feature) are host tensors bound
as one part's output and the next parts' input, so nothing is copied.

Partition (a node belongs to exactly one part):
    O          = ancestors of noise_pred and of the outer layers' cache outputs, not looking past the feature
    deep       = every other node (needed only by the feature and the deep layers' caches)
    outer_in   = the nodes of O the deep part needs, with the caches of the layers found there
    outer_out  = the rest of O
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..manifest import Manifest

PARTS = ("outer_in", "deep", "outer_out")
RUNS = {"step": PARTS, "shallow": ("outer_in", "outer_out")}  # the parts each call runs, in order


@dataclass
class Part:
    """One of the three models: its caches {input name: output name} (for MakeStateful), the links it
    writes and reads (tensor names), and the other graph inputs it reads (sample, timestep, conditioning)."""
    name: str
    model: object  # ov.Model
    caches: dict[str, str]
    links_out: list[str] = field(default_factory=list)
    links_in: list[str] = field(default_factory=list)
    feeds: list[str] = field(default_factory=list)
    request: object = None  # its ov.InferRequest, once the runner has compiled it


def _key(node) -> int:
    return node.get_instance_id()  # Python wrappers are temporary: id() is not a node identity


def _ancestors(starts, stop=None) -> set[int]:
    """Instance ids of `starts` and everything they read, not going past the output port `stop`."""
    stop_key = None if stop is None else (_key(stop.get_node()), stop.get_index())
    seen, stack = set(), list(starts)
    while stack:
        node = stack.pop()
        if _key(node) in seen:
            continue
        seen.add(_key(node))
        stack += [v.get_node() for v in node.input_values() if (_key(v.get_node()), v.get_index()) != stop_key]
    return seen


def split(model, manifest: Manifest) -> tuple[list[Part], str]:
    """Cut an ov.Model of a reuse folder's step graph (not yet stateful) into the three parts of the module
    docstring; returns (parts in run order, the name of the link that carries the reuse feature). The parts
    take over `model`'s nodes: use `model` no further."""
    import openvino as ov
    from openvino import opset13 as ops

    feature, deep_layers = manifest.reuse.feature, set(manifest.reuse.deep_layers)
    results = {}
    for r in model.get_results():
        for name in r.input_value(0).get_names():
            results.setdefault(name, r)
    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    fport = results[feature.output].input_value(0)
    while fport.get_node().get_type_name() in ("Identity", "Convert"):  # the feature output is a copy of it
        fport = fport.get_node().input_value(0)
    outer = [results["noise_pred"]] + [results[c.output] for c in manifest.caches if c.layer not in deep_layers]
    nodes = {_key(n): n for n in model.get_ordered_ops()}
    o_keys = _ancestors(outer, stop=fport)
    deep_nodes = [n for k, n in nodes.items() if k not in o_keys]
    first = _ancestors(deep_nodes) & o_keys
    in_params = {name for name, p in params.items() if _key(p) in first}
    in_caches = [results[c.output] for c in manifest.caches if c.input in in_params]
    in_keys = _ancestors(deep_nodes + in_caches) & o_keys
    part = {k: "outer_in" if k in in_keys else "outer_out" if k in o_keys else "deep" for k in nodes}
    for r in model.get_results():  # a Result goes with what it reads, past copies (the shared a_hat outputs of
        chain, src = [r], r.input_value(0).get_node()  # ov_variant's "share" are Identities of the first layer's:
        while src.get_type_name() == "Identity":  # a cache assigned from another part's link reads garbage
            chain.append(src)
            src = src.input_value(0).get_node()
        for node in chain:
            part[_key(node)] = part[_key(src)]
    for c in manifest.caches:  # an input nobody reads (a shared a_hat, ov_variant's "share") goes with its output
        p = params.get(c.input)
        if p is not None and not p.output(0).get_target_inputs():
            part[_key(p)] = part[_key(results[c.output])]

    new_params = {name: [] for name in PARTS}
    new_results = {name: [] for name in PARTS}
    links: dict[str, list[str]] = {name: [] for name in PARTS}
    links_out: dict[str, list[str]] = {name: [] for name in PARTS}
    feature_link = None
    for k, node in list(nodes.items()):
        if node.get_type_name() == "Constant":
            continue  # constants may be shared by parts: each compiled model copies what it reads
        for out in node.outputs():
            by_part: dict[str, list] = {}
            for t in out.get_target_inputs():
                by_part.setdefault(part[_key(t.get_node())], []).append(t)
            is_param = node.get_type_name() == "Parameter"
            name = node.get_friendly_name() if is_param else sorted(out.get_names())[0] if out.get_names() \
                else f"link.{k}.{out.get_index()}"
            for p, targets in by_part.items():
                if p == part[k]:
                    continue
                prm = ops.parameter(out.get_partial_shape(), out.get_element_type(), name=name)
                prm.output(0).set_names({name})
                for t in targets:
                    t.replace_source_output(prm.output(0))
                new_params[p].append(prm)
                if not is_param:
                    links[p].append(name)
            if not is_param and any(p != part[k] for p in by_part):
                if not out.get_names():  # a tensor the ONNX reader or a rewrite left unnamed (seen with the u8-code
                    out.get_tensor().set_names({name})  # rewrite of AVX2 CPUs): named, so the parts find the link
                new_results[part[k]].append(ops.result(out))
                links_out[part[k]].append(name)
                if (k, out.get_index()) == (_key(fport.get_node()), fport.get_index()):
                    feature_link = name
    for c in manifest.caches:  # a shallow call runs only the outer parts: their caches must be there, the deep ones not
        if c.input in params and (part[_key(params[c.input])] == "deep") != (c.layer in deep_layers):
            raise ValueError(f"internal: the cut put the cache {c.key} in the wrong part")
    if feature_link is None:
        raise ValueError("internal: the reuse feature does not cross from the deep part to outer_out")
    out_parts = []
    for name in PARTS:
        own_results = [r for r in model.get_results() if part[_key(r)] == name
                       and feature.output not in r.input_value(0).get_names()]  # the feature leaves as a link
        own_params = [p for p in model.get_parameters() if part[_key(p)] == name]
        m = ov.Model(own_results + new_results[name], own_params + new_params[name], name)
        caches = {c.input: c.output for c in manifest.caches
                  if c.input in params and part[_key(params[c.input])] == name}
        feeds = [p.get_friendly_name() for p in own_params + new_params[name]
                 if p.get_friendly_name() not in caches and p.get_friendly_name() not in links[name]]
        out_parts.append(Part(name, m, caches, links_out[name], links[name], feeds))
    return out_parts, feature_link
