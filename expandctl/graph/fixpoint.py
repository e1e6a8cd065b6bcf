"""The fixed point that finds linear regions: every node's root (the region input it is an affine map
of), its map, the cuts (values that must stay region outputs) and the reason for each cut."""

from __future__ import annotations

import torch.fx as fx

from .affine import Affine, NotOneLayer
from .ops import ROOT, Step, is_random, linear_step

__all__ = ["GROWTH_LIMIT", "RegionPass", "label", "meta_read", "value_users"]

#: A layer joins the map before it unless that multiplies the parameters by more than this (a
#: depthwise kxk before a 1x1 expansion would become a dense kxk); a chain that grows a little on the
#: way and shrinks at its end (an ExpandNets chain) stays whole. A whole region that would hold
#: more parameters than its steps is left alone.
GROWTH_LIMIT = 1.5


def _is_const(graph: fx.Graph) -> dict[fx.Node, bool]:
    const: dict[fx.Node, bool] = {}
    for n in graph.nodes:
        if n.op == "get_attr":
            const[n] = True
        elif n.op in ("call_function", "call_method", "call_module"):
            const[n] = (
                n.op != "call_module" and not is_random(n) and all(const.get(i, False) for i in n.all_input_nodes)
            )
        else:
            const[n] = False
    return const


_RANK_ATTRS = {"ndim", "dtype", "device", "is_cuda", "layout"}
_SHAPE_ATTRS = {"shape"}


def meta_read(user: fx.Node, node: fx.Node | None = None) -> str | None:
    """``"rank"`` when ``user`` reads only a tensor's rank / dtype / device (the same for every value
    of a region), ``"shape"`` for its shape, ``None`` when it reads the values (of ``node``, when
    given: ``y.reshape_as(node)`` reads only its shape)."""
    if (
        node is not None
        and user.op == "call_method"
        and user.target in ("reshape_as", "view_as", "expand_as", "type_as")
        and user.args[1:2] == (node,)
        and user.args[0] is not node
    ):
        return "rank" if user.target == "type_as" else "shape"
    if user.op == "call_function" and user.target is getattr and len(user.args) == 2:
        attr = user.args[1]
        return "rank" if attr in _RANK_ATTRS else ("shape" if attr in _SHAPE_ATTRS else None)
    if user.op == "call_method" and user.target in ("dim", "ndimension", "size"):
        return "shape" if user.target == "size" else "rank"
    return None


def value_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if meta_read(u, node) is None]


def label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


class RegionPass:
    """The fixed point: roots, maps, cuts and reasons of every node."""

    def __init__(self, gm: fx.GraphModule, values: dict) -> None:
        self.gm, self.values = gm, values
        self.nodes = list(gm.graph.nodes)
        self.const = _is_const(gm.graph)
        self.steps: dict[fx.Node, Step | None] = {
            n: linear_step(n, gm, values, self.const) if not self.const[n] else None for n in self.nodes
        }
        self.cut: set[fx.Node] = set()
        self.reasons: dict[fx.Node, str] = {}
        while not self._sweep():
            pass

    def _sweep(self) -> bool:
        self.root: dict[fx.Node, fx.Node] = {}
        self.maps: dict[fx.Node, Affine] = {}
        new_cuts: set[fx.Node] = set()
        for n in self.nodes:
            self.root[n] = n
            step = self.steps[n]
            if step is None or step.apply is None:
                if step is not None and step.refused:
                    self.reasons[n] = step.refused
                continue
            sources = [i if (i in self.cut or self.root[i] is i) else self.root[i] for i in step.inputs]
            if len(set(sources)) != 1:
                continue  # adds values of different origins: each is its own region's output
            r = sources[0]
            args = [ROOT if (i is r) else self.maps[i] for i in step.inputs]
            try:
                self.maps[n] = step.apply(*args)
                if step.weighted and args[0] is not ROOT:
                    grown, before = self.maps[n].params(), args[0].params() + step.own_params
                    if grown > GROWTH_LIMIT * before:
                        raise NotOneLayer(
                            f"merging it with what precedes it grows the layer ({grown:,} parameters vs {before:,})"
                        )
            except NotOneLayer as e:
                self.reasons[n] = str(e)
                new_cuts |= {i for i in step.inputs if i is not r}
                continue
            self.root[n] = r
        for m in self.nodes:
            if self.root[m] is m or m in self.cut:
                continue
            users = value_users(m)
            folding = [u for u in users if self.root[u] is self.root[m] and u in self.maps]
            if len(users) > 1 and folding:
                new_cuts.add(m)
                self.reasons.setdefault(m, f"its output is read by {len(users)} operations")
        new_cuts -= self.cut
        self.cut |= new_cuts
        return not new_cuts

    def outputs(self) -> list[fx.Node]:
        """Nodes whose value leaves their region (read by a step outside it, or by a non-linear op)."""
        out = []
        for m in self.nodes:
            if self.root[m] is m:
                continue
            users = value_users(m)
            if m in self.cut or not users or any(self.root[u] is not self.root[m] or u not in self.maps for u in users):
                out.append(m)
        return out

    def members(self, out: fx.Node) -> list[fx.Node]:
        r, seen, stack = self.root[out], [], [out]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.append(n)
            for i in self.steps[n].inputs:
                if i is not r and i not in self.cut and self.root[i] is r:
                    stack.append(i)
        order = {n: k for k, n in enumerate(self.nodes)}
        return sorted(seen, key=order.__getitem__)
