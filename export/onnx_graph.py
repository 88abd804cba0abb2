"""A small index over an ONNX graph for pattern rewrites (export/onnx_rewrite.py): who produces and who reads
each tensor, constant values and shapes, node edits as a list, sorted topologically once at the end."""
from __future__ import annotations

import collections
import heapq

import numpy as np
import onnx
from onnx import helper, numpy_helper


class Graph:
    """An index over an ONNX graph: producers, consumers, constants; nodes edited as a list, sorted at the end."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.nodes = list(self.graph.node)
        self.inits = {t.name: t for t in self.graph.initializer}
        self.inputs = {i.name for i in self.graph.input}
        self.outputs = {o.name for o in self.graph.output}
        self.types = {v.name: v.type for v in [*self.graph.value_info, *self.graph.input, *self.graph.output]}
        self._cache: dict[str, np.ndarray] = {}
        self._taken = {*self.inits, *self.inputs, *(o for n in self.nodes for o in n.output),
                       *(n.name for n in self.nodes)}
        self.index()

    def index(self):
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers = collections.defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer, a Constant, or a Reshape of constants; None for anything computed."""
        if name in self._cache:
            return self._cache[name]
        value = None
        if name in self.inits:
            value = numpy_helper.to_array(self.inits[name])
        elif (n := self.producer.get(name)) is not None and n.op_type == "Constant" and n.domain == "":
            if n.attribute and n.attribute[0].name == "value":
                value = numpy_helper.to_array(n.attribute[0].t)
        elif n is not None and n.op_type == "Reshape" and n.domain == "":
            data, shape = self.const(n.input[0]), self.const(n.input[1])
            if data is not None and shape is not None and 0 not in shape.tolist():
                value = data.reshape(shape.tolist())
        if value is not None and value.size <= 4096:  # weights are read once, where they are fused
            self._cache[name] = value
        return value

    def meta(self, name: str) -> tuple[tuple, np.dtype] | None:
        """(shape, dtype) of a constant without reading its data: an initializer or a Reshape of one."""
        if name in self.inits:
            t = self.inits[name]
            return tuple(t.dims), np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        n = self.node(name, "Reshape")
        data, shape = (self.meta(n.input[0]), self.const(n.input[1])) if n is not None else (None, None)
        if data is None or shape is None or 0 in shape.tolist():
            return None
        return np.empty(data[0], np.bool_).reshape(shape.tolist()).shape, data[1]

    def node(self, name: str, op: str, domain: str = "") -> onnx.NodeProto | None:
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op and n.domain == domain else None

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def only_used_by(self, nodes: list, within: list) -> bool:
        """Every output of `nodes` is read by nodes of `within` only (and is no graph output)."""
        inside = {id(n) for n in within}
        return all(o not in self.outputs and all(id(u) in inside for u in self.consumers.get(o, []))
                   for n in nodes for o in n.output if o)

    def fresh(self, hint: str) -> str:
        name, i = hint, 0
        while name in self._taken:
            i += 1
            name = f"{hint}_{i}"
        self._taken.add(name)
        return name

    def add_const(self, array: np.ndarray, hint: str) -> str:
        name = self.fresh(hint)
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def make(self, op: str, inputs: list, outputs: list, hint: str, domain: str = "", **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, outputs, name=self.fresh(hint), domain=domain, **attrs)

    def replace(self, old: list, new: list):
        gone = {id(n) for n in old}
        self.nodes = [n for n in self.nodes if id(n) not in gone] + list(new)
        self.index()

    def rename_uses(self, old: str, new: str):
        for n in self.consumers.get(old, []):
            for i, name in enumerate(n.input):
                if name == old:
                    n.input[i] = new

    def same_shape(self, a: str, b: str) -> int:
        """The rank when a and b have the same recorded shape (equal dims or dim names), else 0."""
        ta, tb = self.types.get(a), self.types.get(b)
        if ta is None or tb is None or not ta.tensor_type.HasField("shape") or not tb.tensor_type.HasField("shape"):
            return 0
        da, db = ta.tensor_type.shape.dim, tb.tensor_type.shape.dim
        key = lambda d: d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
        ka, kb = [key(d) for d in da], [key(d) for d in db]
        return len(ka) if ka == kb and None not in ka else 0

    def finish(self):
        """Drop what no longer feeds an output, sort topologically, write the lists back."""
        live, stack = set(self.outputs), list(self.outputs)
        while stack:
            n = self.producer.get(stack.pop())
            if n is not None and id(n) not in live:
                live.add(id(n))
                for i in n.input:
                    if i and i not in live:
                        live.add(i)
                        stack.append(i)
        self.nodes = [n for n in self.nodes if id(n) in live]
        self.index()
        order = {id(n): k for k, n in enumerate(self.nodes)}
        waiting = {id(n): sum(1 for i in set(n.input) if i in self.producer) for n in self.nodes}
        ready = [(order[id(n)], n) for n in self.nodes if waiting[id(n)] == 0]
        heapq.heapify(ready)
        done = []
        while ready:
            _, n = heapq.heappop(ready)
            done.append(n)
            for o in n.output:
                for u in {id(u): u for u in self.consumers.get(o, [])}.values():
                    waiting[id(u)] -= sum(1 for i in set(u.input) if i == o)
                    if waiting[id(u)] == 0:
                        heapq.heappush(ready, (order[id(u)], u))
        if len(done) != len(self.nodes):
            raise RuntimeError("the edited graph has a cycle (a bug in the rewrite)")
        used = {i for n in done for i in n.input}
        self.graph.ClearField("node")
        self.graph.node.extend(done)
        for i in reversed(range(len(self.graph.initializer))):  # in place: extend() would copy every weight
            if self.graph.initializer[i].name not in used and self.graph.initializer[i].name not in self.outputs:
                del self.graph.initializer[i]
        names = used | {o for n in done for o in n.output}
        vi = [v for v in self.graph.value_info if v.name in names]
        self.graph.ClearField("value_info")
        self.graph.value_info.extend(vi)


def attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def other_input(node, name: str) -> str | None:
    """The other operand of a two-input node that reads `name`."""
    if len(node.input) != 2:
        return None
    a, b = node.input
    return b if a == name else a if b == name else None


def scalar(g: Graph, name: str) -> float | None:
    v = g.const(name)
    return float(v.reshape(())) if v is not None and v.size == 1 and v.ndim <= 1 else None


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = collections.Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph.node)
    return dict(sorted(c.items()))
