"""Find every maximal linear region of a traced model and merge each into one layer.

A region maps one tensor ``x`` (its *root*) to one tensor through linear steps only
(:mod:`.ops`); every value inside it is an :class:`~.affine.Affine` of ``x``. The pass runs the
model once in float64 to know every value, then, in topological order, extends each linear node's
map from its inputs' maps when they share a root. A value read by more than one operation, or
by one that does not fold it, is a region's output; a step whose result is not one layer cuts its
input off (that input becomes a region output, the step starts a new region) and is reported with
the reason. Each region with at least two steps and one layer is replaced by the layer its map
defines, after a float64 check on the region's own input, unless the merged layer would hold more
parameters than the steps it replaces.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .fixpoint import RegionPass, label, meta_read
from .trace import Untraceable, run_values, trace

__all__ = ["GraphPlan", "Region", "contract_graph", "plan_graph"]

#: A merge is accepted when, on the region's own input in float64, its output differs from the
#: region's by at most this much relative to the largest output value.
REGION_RTOL = 1e-9


@dataclass
class Region:
    """One linear region: what it covers and the layer it became (or why it stayed)."""

    name: str
    root: str
    output: str
    steps: list[str]
    modules: list[str]
    became: str
    params_before: int
    params_after: int
    error: float | None = None
    merged: bool = False
    reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "input": self.root,
            "output": self.output,
            "steps": self.steps,
            "modules": self.modules,
            "became": self.became,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "error": self.error,
            "merged": self.merged,
            "reason": self.reason,
        }


@dataclass
class GraphPlan:
    """What ``contract --graph`` found: regions merged, candidates left alone, opaque modules."""

    regions: list[Region] = field(default_factory=list)
    left_alone: list[dict] = field(default_factory=list)
    opaque: dict[str, str] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    @property
    def merged(self) -> list[Region]:
        return [r for r in self.regions if r.merged]

    def to_dict(self) -> dict:
        return {
            "regions_merged": len(self.merged),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "regions": [r.to_dict() for r in self.regions],
            "left_alone": self.left_alone,
            "opaque": [{"module": k, "reason": v} for k, v in self.opaque.items()],
        }


def _count(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def _constants_of(nodes: list[fx.Node], gm: fx.GraphModule, const) -> list[torch.Tensor]:
    """Every parameter / buffer the nodes read (call_module targets' and constant subgraphs')."""
    seen: dict[int, torch.Tensor] = {}
    stack = list(nodes)
    visited = set()
    while stack:
        n = stack.pop()
        if n in visited:
            continue
        visited.add(n)
        if n.op == "call_module" and n in nodes:
            m = gm.get_submodule(n.target)
            for t in list(m.parameters()) + list(m.buffers()):
                seen[id(t)] = t
        elif n.op == "get_attr":
            obj = _get_attr(gm, n.target)
            if isinstance(obj, torch.Tensor):
                seen[id(obj)] = obj
        for i in n.all_input_nodes:
            if const.get(i, False):
                stack.append(i)
    return list(seen.values())


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    prefix = []
    for tokens in zip(*parts):
        if len(set(tokens)) != 1:
            break
        prefix.append(tokens[0])
    # the prefix must name a module, not the merged layer itself
    if len(parts) == 1 or prefix == parts[0]:
        prefix = prefix[:-1]
    return ".".join(prefix)


def _fresh_name(gm: fx.GraphModule, base: str, taken: set[str]) -> str:
    """A new top-level name (``stages_0_1_merged``): a layer added inside the user's own modules would
    change them (appended to an ``nn.Sequential``, it would run when the Sequential runs)."""
    stem = f"{base.replace('.', '_')}_merged" if base else "merged"
    name, k = stem, 1
    while name in taken or _exists(gm, name):
        k += 1
        name = f"{stem}_{k}"
    taken.add(name)
    return name


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _eval_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy (not ``.eval()``'s return value: some modules' ``train()`` returns None)."""
    copied = copy.deepcopy(model)
    copied.eval()
    return copied


def _analyse(model: nn.Module, example_inputs: tuple):
    gm, opaque = trace(_eval_copy(model), len(example_inputs))
    # Traced again in float64: arithmetic on buffers alone (a BNAndPad shift) is folded into constants
    # while tracing, in the dtype of the traced model; the analysis needs it in float64.
    gm64, _ = trace(_eval_copy(model).double(), len(example_inputs))
    if [n.name for n in gm.graph.nodes] != [n.name for n in gm64.graph.nodes]:
        gm64 = copy.deepcopy(gm).double()
    inputs64 = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = run_values(gm64, inputs64)
    return gm, gm64, opaque, values


def plan_graph(model: nn.Module, example_inputs) -> GraphPlan:
    """The plan of :func:`contract_graph` without building anything."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return _contract(model, tuple(example_inputs), apply=False)[1]


def contract_graph(model: nn.Module, example_inputs) -> fx.GraphModule:
    """A module computing what ``model`` computes in eval mode, with every maximal linear region that
    is exactly one convolution or linear layer merged into that layer (a ``torch.fx.GraphModule``;
    ``result.graph_plan`` says what was merged, left alone and why). ``model`` is not changed."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    gm, plan = _contract(model, tuple(example_inputs), apply=True)
    gm.graph_plan = plan
    return gm


@torch.no_grad()
def _contract(model: nn.Module, example_inputs: tuple, apply: bool) -> tuple[fx.GraphModule | None, GraphPlan]:
    plan = GraphPlan(params_before=_count(model))
    try:
        gm, gm64, opaque, values = _analyse(model, example_inputs)
    except Untraceable as e:
        plan.opaque[type(model).__name__] = str(e)
        return _contract_untraceable(model, example_inputs, apply, plan), plan
    plan.opaque = dict(opaque)
    _contract_opaque(gm if apply else gm64, gm64, values, opaque, apply, plan)
    p = RegionPass(gm64, values)
    dtype = _model_dtype(model)
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    by_name = {n.name: n for n in gm.graph.nodes}
    gm64_nodes = {n.name: n for n in gm64.graph.nodes}
    taken: set[str] = set()
    replacements: list[tuple] = []
    for n in gm.graph.nodes:
        v = values.get(gm64_nodes.get(n.name))
        n.meta["shape"] = tuple(v.shape) if isinstance(v, torch.Tensor) else None
    for out in p.outputs():
        nodes = p.members(out)
        judged = _judge(p, out, nodes, gm64, values)
        if judged is None:
            continue
        region, rep = judged
        plan.regions.append(region)
        if not region.merged:
            continue
        interior = [by_name[n.name] for n in nodes if n is not out]
        replacements.append((by_name[p.root[out].name], by_name[out.name], rep.module(dtype, device), interior, region))
        base = _common_prefix(region.modules)
        if base and not _exists(gm, base):
            base = ""
        region.name = _fresh_name(gm, base, taken)
    for n, reason in p.reasons.items():
        if n.op in ("placeholder", "output"):
            continue
        plan.left_alone.append({"at": label(n), "kind": p.steps[n].kind if p.steps[n] else n.op, "reason": reason})
    if not apply:
        plan.params_after = plan.params_before - _saved(plan)
        return None, plan
    _replace(gm, replacements)
    plan.params_after = _count(gm)
    return gm, plan


def _judge(p: RegionPass, out: fx.Node, nodes: list[fx.Node], gm64: fx.GraphModule, values: dict):
    """``(region, its map)`` for the region ending at ``out``, ``merged`` when its one layer is smaller
    and passes the float64 check on the region's own input (else ``reason`` says why); ``None`` when
    the region is not worth reporting (no layer, or fewer than two meaningful steps)."""
    steps = [p.steps[n] for n in nodes]
    layers = sum(1 for s in steps if s.weighted)
    meaningful = [s for s in steps if s.kind not in ("identity", "contiguous", "clone", "detach")]
    if layers == 0 or len(meaningful) < 2:
        return None
    rep = p.maps[out]
    before = sum(t.numel() for t in _constants_of(nodes, gm64, p.const))
    root = p.root[out]
    region = Region(
        name="",
        root=label(root),
        output=label(out),
        steps=[f"{label(n)} ({p.steps[n].kind})" for n in nodes],
        modules=sorted({m for s in steps for m in s.modules}),
        became=rep.describe(),
        params_before=before,
        params_after=rep.params(),
    )
    if rep.params() > before:
        region.reason = f"the merged layer would hold more parameters ({rep.params():,} vs {before:,})"
        return region, rep
    got = rep.module(torch.float64)(values[root])
    want = values[out]
    if got.shape != want.shape:
        region.reason = f"the region reshapes its input ({tuple(values[root].shape)} to {tuple(want.shape)})"
        return region, rep
    scale = float(want.abs().max()) or 1.0
    region.error = float((got - want).abs().max()) / scale
    if not region.error <= REGION_RTOL:
        region.reason = f"the float64 check failed (relative error {region.error:.2e})"
        return region, rep
    region.merged = True
    return region, rep


def _contract_untraceable(model: nn.Module, example_inputs: tuple, apply: bool, plan: GraphPlan):
    """A model fx cannot trace at the top: its children are contracted each on its own input; with
    ``apply``, a graph calling the whole (contracted) model as one leaf, else ``None``."""
    whole = _eval_copy(model)
    _contract_children(whole, example_inputs, apply, "", plan)
    plan.params_after = _count(whole) if apply else plan.params_before - _saved(plan)
    if not apply:
        return None
    holder = nn.Module()
    holder.model = whole
    return fx.GraphModule(holder, _opaque_graph(len(example_inputs)))


def _saved(plan: GraphPlan) -> int:
    return sum(r.params_before - r.params_after for r in plan.merged)


def _contract_opaque(gm, gm64, values, opaque: dict[str, str], apply: bool, plan: GraphPlan) -> None:
    """The modules fx could not trace stay whole, but their children are contracted each on the input it
    sees (a block with shape-dependent control flow still has conv -> BN pairs inside)."""
    outer = [p for p in opaque if not any(p.startswith(q + ".") for q in opaque if q != p)]
    for path in outer:
        calls = [n for n in gm64.graph.nodes if n.op == "call_module" and n.target == path]
        if len(calls) != 1 or calls[0].kwargs:
            continue
        args = tuple(values.get(a) for a in calls[0].args)
        if not all(isinstance(a, torch.Tensor) for a in args):
            continue
        module = gm.get_submodule(path)
        dtype = _model_dtype(module)
        _contract_children(module, tuple(a.to(dtype) if a.is_floating_point() else a for a in args), apply, path, plan)


def _contract_children(module: nn.Module, inputs: tuple, apply: bool, prefix: str, plan: GraphPlan) -> None:
    """Run ``module`` once, record each child's inputs, and contract each child called once on them
    (in place on ``module`` when ``apply``); their regions join ``plan`` under ``prefix``."""
    seen: dict[str, list] = {}
    hooks = [
        child.register_forward_pre_hook(lambda m, a, k=name: seen.setdefault(k, []).append(a))
        for name, child in module.named_children()
        if any(True for _ in child.parameters())
    ]
    try:
        reference = _run(module, inputs)
    except Exception:  # the module does not run on these inputs alone: leave it whole
        return
    finally:
        for h in hooks:
            h.remove()
    for name, calls in seen.items():
        if len(calls) != 1 or not calls[0] or not all(isinstance(a, torch.Tensor) for a in calls[0]):
            continue
        path = f"{prefix}.{name}" if prefix else name
        new, sub = _contract(getattr(module, name), tuple(calls[0]), apply)
        for r in sub.regions:
            r.name = f"{path}.{r.name}" if r.name else ""
            r.modules = [f"{path}.{m}" for m in r.modules]
            r.root, r.output = f"{path}: {r.root}", f"{path}: {r.output}"
        plan.regions += sub.regions
        plan.left_alone += [{**i, "at": f"{path}: {i['at']}"} for i in sub.left_alone]
        plan.opaque.update({f"{path}.{k}" if k != type(getattr(module, name)).__name__ else path: v
                            for k, v in sub.opaque.items()})  # fmt: skip
        if apply and new is not None and sub.merged:
            old = getattr(module, name)
            setattr(module, name, ContractedChild(new, old))
            if not _same_output(reference, module, inputs):  # the parent needs more of the child than its forward
                setattr(module, name, old)
                for r in sub.regions:
                    r.merged, r.reason = False, "its module is used by its parent beyond its forward"


class ContractedChild(nn.Module):
    """A child of an untraceable module, contracted: runs ``merged`` and keeps the plain settings of the
    module it replaces (``self.resolution``...), which its parent may read."""

    def __init__(self, merged: nn.Module, original: nn.Module) -> None:
        super().__init__()
        self.merged = merged
        for key, value in vars(original).items():
            if not key.startswith("_") and key != "training" and isinstance(value, (int, float, str, bool, tuple)):
                setattr(self, key, value)

    def forward(self, *args, **kwargs):
        return self.merged(*args, **kwargs)


def _run(module: nn.Module, inputs: tuple):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return module(*inputs)


def _same_output(reference, module: nn.Module, inputs: tuple) -> bool:
    try:
        out = _run(module, inputs)
    except Exception:
        return False
    if not isinstance(out, torch.Tensor) or not isinstance(reference, torch.Tensor) or out.shape != reference.shape:
        return False
    tol = 1e-9 if out.dtype == torch.float64 else 1e-4
    return float((out - reference).abs().max()) <= tol * max(float(reference.abs().max()), 1e-30)


def _replace(gm: fx.GraphModule, replacements) -> None:
    mapping: dict[fx.Node, fx.Node] = {}
    attrs_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for root, out, layer, interior, region in replacements:
        name = region.name
        gm.add_submodule(name, layer)
        src = mapping.get(root, root)
        with gm.graph.inserting_before(out):
            new = gm.graph.call_module(name, (src,))
        out.replace_all_uses_with(new)
        mapping[out] = new
        for n in interior:  # rank / shape reads of inner values read the region's input instead
            for u in list(n.users):
                kind = meta_read(u, n)
                if kind == "rank" or (kind == "shape" and n.meta.get("shape") == src.meta.get("shape")):
                    u.replace_input_with(n, src)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    still = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in attrs_before - still:  # parameters and buffers only the merged steps read
        owner, _, name = target.rpartition(".")
        try:
            module = gm.get_submodule(owner) if owner else gm
        except AttributeError:
            continue
        if hasattr(module, name):
            delattr(module, name)
    gm.recompile()


def _opaque_graph(n_inputs: int) -> fx.Graph:
    """A graph that calls the whole model as one leaf (an untraceable model, returned unchanged)."""
    g = fx.Graph()
    xs = [g.placeholder(f"x{i}") for i in range(n_inputs)]
    g.output(g.call_module("model", tuple(xs)))
    return g
