"""Graph rewrite for ONNX Runtime: the portable export's traced ops -> ONNX Runtime's fused CPU kernels.

The torch model (export/model.py) stays the one forward: export traces it, and this pass rewrites patterns of
the graph it wrote, each only where it is found exactly (anything else is left as it is):
  residual   MatMul * scalar into the residual Add (MiniCPM4's scale_depth / sqrt(layers)): the scalar folded
             into the weights (into the scales of a MatMulNBits)
  rms_norm   Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul -> SimplifiedLayerNormalization
  skip_norm  residual Add + SimplifiedLayerNormalization -> com.microsoft.SkipSimplifiedLayerNormalization
  qkv        the q/k/v projections of a GroupQueryAttention -> one MatMul (MatMulNBits: codes, scales and zero
             points concatenated along N), then Split, or packed straight into the attention (with rotary)
  rotary     the traced rotate-half RoPE -> GroupQueryAttention's own (do_rotary=1, rotary_interleaved=0), the
             export's cos/sin tables as cos_cache/sin_cache (LongRoPE factors and scale are in them). Only where
             the rotated q/k feed nothing else: InfLLM v2's selection (sparse graphs) reads them, so there the
             RoPE stays in the graph.
  gate_up    gate/up projections of the SiLU MLP -> one MatMul + Split
  gqa_out    GroupQueryAttention's output reshaped to heads and back -> the output itself
Docs: docs/export.md, "Graph rewrite for ONNX Runtime".
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from export.checkpoint import CheckpointError
from export.onnx_export import EXTERNAL_DATA_BYTES
from export.onnx_graph import Graph, attr, op_counts, other_input, scalar

MS = "com.microsoft"
FUSIONS = ("residual", "rms_norm", "skip_norm", "qkv", "rotary", "gate_up", "gqa_out")


class RewriteError(CheckpointError):
    """A folder this pass cannot rewrite; one line naming it."""


# --- projections ---------------------------------------------------------------------------------------
class Projection:
    """x @ W as MatMul (W a float constant (K, N)) or MatMulNBits (codes (N, G, block/2), scales, zeros)."""

    def __init__(self, g: Graph, node, x: str, n: int, metas: list, attrs: dict):
        self.g, self.node, self.x, self.n, self.metas, self.attrs = g, node, x, n, metas, attrs

    def part(self, k: int) -> np.ndarray:
        return self.g.const(self.node.input[1 + k])

    def key(self):
        """Projections with equal keys concatenate along N: same input, K, dtypes, and for MatMulNBits the same
        bits / block size / accuracy level and zero points either in all or in none."""
        if self.node.op_type == "MatMul":
            return ("MatMul", self.x, self.metas[0][0][0], self.metas[0][1])
        attrs = tuple(sorted((k, v) for k, v in self.attrs.items() if k != "N"))
        return ("MatMulNBits", self.x, attrs, tuple((shape[1:], dtype) for shape, dtype in self.metas))


def projection(g: Graph, name: str) -> Projection | None:
    n = g.producer.get(name)
    if n is None:
        return None
    if n.op_type == "MatMul" and n.domain == "":
        w = g.meta(n.input[1])
        if w is None or len(w[0]) != 2 or w[1] != np.float32:
            return None
        return Projection(g, n, n.input[0], w[0][1], [w], {})
    if n.op_type == "MatMulNBits" and n.domain == MS and len(n.input) in (3, 4):
        metas = [g.meta(i) for i in n.input[1:]]
        if None in metas:
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        return Projection(g, n, n.input[0], attrs["N"], metas, attrs)
    return None


def fused_projection(g: Graph, projs: list[Projection], out: str, hint: str) -> onnx.NodeProto | None:
    """One node computing every projection of `projs` side by side (outputs concatenated along N)."""
    if len({p.key() for p in projs}) != 1:
        return None
    first = projs[0]
    if first.node.op_type == "MatMul":
        w = g.add_const(np.concatenate([p.part(0) for p in projs], axis=1), f"{hint}.weight")
        return g.make("MatMul", [first.x, w], [out], hint)
    parts = [g.add_const(np.concatenate([p.part(k) for p in projs], axis=0), f"{hint}.{kind}")
             for k, kind in zip(range(len(first.metas)), ("qweight", "scales", "zeros"))]
    attrs = dict(first.attrs, N=sum(p.n for p in projs))
    return g.make("MatMulNBits", [first.x, *parts], [out], hint, domain=MS, **attrs)


def split_node(g: Graph, source: str, sizes: list[int], outputs: list[str], hint: str) -> onnx.NodeProto:
    return g.make("Split", [source, g.add_const(np.array(sizes, np.int64), f"{hint}.sizes")], outputs, hint, axis=-1)


# --- the fusions ---------------------------------------------------------------------------------------
def fold_residual_scale(g: Graph) -> int:
    """Add(h, Mul(x @ W, c)) -> Add(h, x @ (W c)): the residual branch's scalar moves into the weights."""
    count = 0
    for mul in [n for n in g.nodes if n.op_type == "Mul" and n.domain == ""]:
        for y in mul.input:
            c = scalar(g, other_input(mul, y) or "")
            p = projection(g, y)
            users = g.consumers.get(mul.output[0], [])
            if c is None or p is None or g.sole_consumer(y) is not mul or not users or \
                    any(u.op_type != "Add" or u.domain != "" for u in users) or mul.output[0] in g.outputs:
                continue
            if p.node.op_type == "MatMul":
                w = g.add_const(p.part(0) * np.float32(c), f"{p.node.input[1]}.scaled")
                new = g.make("MatMul", [p.x, w], [y], p.node.name)
            elif p.metas[1][1] == np.float32:
                scales = g.add_const(p.part(1) * np.float32(c), f"{p.node.input[2]}.scaled")
                inputs = [p.x, p.node.input[1], scales, *p.node.input[3:]]
                new = g.make("MatMulNBits", inputs, [y], p.node.name, domain=MS, **p.attrs)
            else:
                continue  # fp16 scales: folding would round them
            g.rename_uses(mul.output[0], y)
            g.replace([p.node, mul], [new])
            count += 1
            break
    return count


def fuse_rms_norm(g: Graph) -> int:
    """x * Reciprocal(Sqrt(ReduceMean(x^2, -1) + eps)) * gamma -> SimplifiedLayerNormalization(x, gamma)."""
    count = 0
    for rec in [n for n in g.nodes if n.op_type == "Reciprocal" and n.domain == ""]:
        sqrt = g.node(rec.input[0], "Sqrt")
        add = sqrt and g.node(sqrt.input[0], "Add")
        mean, eps = None, None
        for i in (add.input if add else []):
            if (m := g.node(i, "ReduceMean")) is not None:
                mean, eps = m, scalar(g, other_input(add, i))
        pow_ = mean and g.node(mean.input[0], "Pow")
        if pow_ is None or eps is None or scalar(g, pow_.input[1]) != 2.0 or attr(mean, "keepdims", 1) != 1:
            continue
        axes = attr(mean, "axes") if len(mean.input) < 2 else g.const(mean.input[1])
        x = pow_.input[0]
        m1 = g.sole_consumer(rec.output[0])
        if axes is None or list(np.asarray(axes).reshape(-1)) != [-1] or m1 is None or m1.op_type != "Mul" or \
                other_input(m1, rec.output[0]) != x:
            continue
        m2 = g.sole_consumer(m1.output[0])
        gamma_name = other_input(m2, m1.output[0]) if m2 is not None and m2.op_type == "Mul" else None
        gamma = g.const(gamma_name) if gamma_name else None
        chain = [pow_, mean, add, sqrt, rec, m1]
        if gamma is None or gamma.ndim != 1 or gamma.dtype != np.float32 or not g.only_used_by(chain, chain + [m2]):
            continue
        norm = g.make("SimplifiedLayerNormalization", [x, gamma_name], [m2.output[0]], m2.name, axis=-1,
                      epsilon=eps, stash_type=1)
        g.replace(chain + [m2], [norm])
        count += 1
    return count


def fuse_skip_norm(g: Graph) -> int:
    """s = a + b feeding a SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization(a, b), s its 4th output."""
    count = 0
    for norm in [n for n in g.nodes if n.op_type == "SimplifiedLayerNormalization" and n.domain == ""]:
        add = g.node(norm.input[0], "Add")
        if add is None or len(norm.output) != 1 or attr(norm, "axis", -1) != -1 or \
                any(g.const(i) is not None for i in add.input) or g.same_shape(*add.input) not in (2, 3):
            continue
        s = add.output[0]
        keep_sum = s in g.outputs or len(g.consumers[s]) > 1
        fused = g.make("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
                       [norm.output[0], "", "", s] if keep_sum else [norm.output[0]], norm.name, domain=MS,
                       epsilon=attr(norm, "epsilon", 1e-5))
        g.replace([add, norm], [fused])
        count += 1
    return count


def rope(g: Graph, name: str):
    """name = Concat(x1 cos - x2 sin, x2 cos + x1 sin) over the halves (x1, x2) of a (B, T, H, D) tensor, with
    cos/sin = Unsqueeze(GatherND(table, Unsqueeze(positions, -1)), 2): (source, cos table, sin table,
    positions, nodes) or None."""
    cat = g.node(name, "Concat")
    if cat is None or len(cat.input) != 2 or attr(cat, "axis") not in (-1, 3):
        return None
    sub, add = g.node(cat.input[0], "Sub"), g.node(cat.input[1], "Add")
    muls = [g.node(i, "Mul") for i in ([*sub.input, *add.input] if sub and add else [])]
    if len(muls) != 4 or None in muls:
        return None
    split = g.node(muls[0].input[0], "Split") or g.node(muls[0].input[1], "Split")
    if split is None or len(split.output) != 2 or attr(split, "axis") not in (-1, 3):
        return None
    x1, x2 = split.output
    if len(split.input) > 1 and split.input[1]:
        sizes = g.const(split.input[1])
        if sizes is None or len(set(sizes.tolist())) != 1:
            return None
    elif attr(split, "num_outputs") != 2:
        return None
    c, s = other_input(muls[0], x1), other_input(muls[1], x2)  # sub = x1 * c - x2 * s
    pairs = {frozenset(m.input) for m in muls[2:]}
    if c is None or s is None or pairs != {frozenset((x2, c)), frozenset((x1, s))}:
        return None
    tables, index = [], set()
    for t in (c, s):
        unsq = g.node(t, "Unsqueeze")
        gather = unsq and g.node(unsq.input[0], "GatherND")
        table = gather and g.const(gather.input[0])
        if table is None or table.ndim != 2 or table.dtype != np.float32 or attr(gather, "batch_dims", 0) != 0 or \
                len(unsq.input) < 2 or g.const(unsq.input[1]) is None or g.const(unsq.input[1]).tolist() != [2]:
            return None
        tables.append((gather.input[0], table.shape))
        index.add(gather.input[1])
    pos = g.node(index.pop(), "Unsqueeze") if len(index) == 1 else None
    if pos is None or pos.input[0] not in g.inputs or g.const(pos.input[1]) is None or \
            g.const(pos.input[1]).tolist() != [-1] or tables[0][1] != tables[1][1]:
        return None
    return split.input[0], tables[0][0], tables[1][0], pos.input[0], tables[0][1][1], [cat, sub, add, *muls, split]


def heads_reshape(g: Graph, name: str, heads: int, head_dim: int) -> onnx.NodeProto | None:
    """The Reshape making `name` of a Reshape to (.., .., heads, head_dim) given as a Concat of pieces."""
    r = g.node(name, "Reshape")
    shape = r and g.node(r.input[1], "Concat")
    if shape is None or len(shape.input) != 4:
        return None
    tail = [g.const(i) for i in shape.input[2:]]
    return r if all(t is not None and t.size == 1 for t in tail) and \
        [int(t.reshape(())) for t in tail] == [heads, head_dim] else None


def through_reshapes(g: Graph, name: str) -> tuple[str, list]:
    nodes = []
    while (r := g.node(name, "Reshape")) is not None:
        nodes.append(r)
        name = r.input[0]
    return name, nodes


def fuse_attention_inputs(g: Graph, skipped: collections.Counter) -> tuple[int, int, int]:
    """Per GroupQueryAttention: q/k/v projections -> one, RoPE -> the op's own, output reshapes -> none."""
    qkv = rotary = out = 0
    batch_dims = {n.output[0] for n in g.nodes if n.op_type == "Shape" and n.input[0] in
                  {a.input[3] for a in g.nodes if a.op_type == "GroupQueryAttention" and len(a.input) > 3}
                  and attr(n, "start", 0) == 0 and attr(n, "end") == 1}
    for gqa in [n for n in g.nodes if n.op_type == "GroupQueryAttention" and n.domain == MS]:
        if len(gqa.input) < 7 or not gqa.input[1] or not gqa.input[2] or attr(gqa, "do_rotary", 0):
            continue
        heads, kv_heads = attr(gqa, "num_heads"), attr(gqa, "kv_num_heads")
        found = []  # per q, k, v: (projection, rope match or None, nodes from the projection to the input)
        for i in range(3):
            src, reshapes = through_reshapes(g, gqa.input[i])
            r = rope(g, src) if i < 2 else None
            if r is not None:
                src, more = through_reshapes(g, r[0])
                reshapes += more
            found.append((projection(g, src), r, reshapes))
        projs = [f[0] for f in found]
        if None in projs or len({p.key() for p in projs}) != 1:
            skipped["qkv: projections not found or not alike; left as they are"] += 1
            continue
        nq, nkv = projs[0].n, projs[1].n
        d = nq // heads
        alike = nq == heads * d and nkv == kv_heads * d and projs[2].n == nkv
        # Rotary inside the op: the exact RoPE on q and k, read by nothing else, positions the op's own.
        ropes = [found[0][1], found[1][1]]
        chain = [p.node for p in projs] + [n for f in found for n in f[2] + (f[1][5] if f[1] else [])]
        can_rotate = None not in ropes and ropes[0][1:5] == ropes[1][1:5] and ropes[0][4] * 2 == d \
            and d % 16 == 0 and (d // 2) % 8 == 0 and alike \
            and (len(gqa.input) <= 7 or not any(gqa.input[7:10])) \
            and heads_reshape(g, ropes[0][0], heads, d) and heads_reshape(g, ropes[1][0], kv_heads, d) \
            and seqlens_from(g, gqa.input[5], ropes[0][3]) and g.only_used_by(chain, chain + [gqa])
        if not can_rotate and None not in ropes:
            skipped["rotary: RoPE stays in the graph (the rotated q/k feed other nodes too, e.g. InfLLM v2's "
                    "selection, or the positions are not seqlens_k's)"] += 1
        packed = g.fresh(f"{gqa.name}.qkv")
        fused = fused_projection(g, projs, packed, f"{gqa.name}.qkv_proj")
        if fused is None:
            continue
        if can_rotate:
            inputs = [packed, "", "", *gqa.input[3:7], ropes[0][1], ropes[0][2], *gqa.input[9:]]
            attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
            new = g.make("GroupQueryAttention", inputs, list(gqa.output), gqa.name, domain=MS,
                         **dict(attrs, do_rotary=1, rotary_interleaved=0))
            g.replace(chain + [gqa], [fused, new])
            gqa, rotary = new, rotary + 1
        else:
            split = split_node(g, packed, [p.n for p in projs], [p.node.output[0] for p in projs], f"{gqa.name}.qkv")
            g.replace([p.node for p in projs], [fused, split])
        qkv += 1
        out += drop_output_reshapes(g, gqa, heads, d, batch_dims)
    return qkv, rotary, out


def seqlens_from(g: Graph, seqlens: str, positions: str) -> bool:
    """seqlens_k = int32(positions[:, -1]): the op then rotates row b's token s at positions[b, s] (the kit's
    contract: consecutive positions per row), the same positions the RoPE table was gathered at."""
    cast = g.node(seqlens, "Cast")
    last = cast and g.node(cast.input[0], "Gather")
    return bool(last and attr(cast, "to") == onnx.TensorProto.INT32 and last.input[0] == positions
                and attr(last, "axis") == 1 and scalar(g, last.input[1]) == -1)


def drop_output_reshapes(g: Graph, gqa, heads: int, d: int, batch_dims: set) -> int:
    """(B, T, H D) -> Reshape (s0, s1, H, D) -> Reshape (s0, s1, -1) is the identity when s0 is the batch
    (a past_key's dim 0, which the op requires to be B): then s1 = T by element count."""
    r1 = heads_reshape(g, g.sole_consumer(gqa.output[0]).output[0], heads, d) \
        if g.sole_consumer(gqa.output[0]) is not None else None
    r2 = r1 and g.sole_consumer(r1.output[0])
    shape1 = r1 and g.node(r1.input[1], "Concat")
    shape2 = r2 and r2.op_type == "Reshape" and g.node(r2.input[1], "Concat")
    if not shape2 or len(shape2.input) != 3 or list(shape2.input[:2]) != list(shape1.input[:2]) or \
            shape1.input[0] not in batch_dims or scalar(g, shape2.input[2]) != -1 or r2.output[0] in g.outputs:
        return 0
    g.rename_uses(r2.output[0], gqa.output[0])
    g.replace([r1, r2], [])
    return 1


def fuse_gate_up(g: Graph) -> int:
    """silu(x @ Wg) * (x @ Wu), silu as x * Sigmoid(x) -> one projection + Split."""
    count = 0
    for sig in [n for n in g.nodes if n.op_type == "Sigmoid" and n.domain == ""]:
        gate = sig.input[0]
        silu = g.sole_consumer(sig.output[0])
        if silu is None or silu.op_type != "Mul" or other_input(silu, sig.output[0]) != gate:
            continue
        prod = g.sole_consumer(silu.output[0])
        up = other_input(prod, silu.output[0]) if prod is not None and prod.op_type == "Mul" else None
        pg, pu = projection(g, gate), projection(g, up) if up else None
        if pg is None or pu is None or {id(u) for u in g.consumers[gate]} != {id(sig), id(silu)} or \
                g.sole_consumer(up) is not prod or pg.key() != pu.key() or pg.n != pu.n:
            continue
        both = g.fresh(f"{pg.node.name}.gate_up")
        fused = fused_projection(g, [pg, pu], both, f"{pg.node.name}.gate_up_proj")
        g.replace([pg.node, pu.node], [fused, split_node(g, both, [pg.n, pu.n], [gate, up], f"{pg.node.name}.gate_up")])
        count += 1
    return count


def rewrite_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Apply every fusion where its pattern matches exactly; returns the model (edited in place) and what
    was done."""
    before = op_counts(model)
    g = Graph(model)
    skipped: collections.Counter = collections.Counter()
    fusions = dict.fromkeys(FUSIONS, 0)
    fusions["residual"] = fold_residual_scale(g)
    fusions["rms_norm"] = fuse_rms_norm(g)
    fusions["skip_norm"] = fuse_skip_norm(g)
    fusions["qkv"], fusions["rotary"], fusions["gqa_out"] = fuse_attention_inputs(g, skipped)
    fusions["gate_up"] = fuse_gate_up(g)
    if any(fusions.values()):
        g.finish()
        if not any(o.domain == MS for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS, 1))
    after = op_counts(model)
    return model, {"fusions": fusions, "skipped": dict(skipped),
                   "nodes_before": sum(before.values()), "nodes_after": sum(after.values()),
                   "ops_before": before, "ops_after": after}


# --- the export folder ---------------------------------------------------------------------------------
def rewrite_export(export_dir: Path) -> dict:
    """Rewrite export_dir/model.onnx (and model.onnx.data) in place; record the summary in export.json."""
    export_dir = Path(export_dir)
    info_path, graph_path = export_dir / "export.json", export_dir / "model.onnx"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise RewriteError(f"{info_path}: not found; is {export_dir} an export folder (cpm-edge export)?") from None
    except (OSError, json.JSONDecodeError) as e:
        raise RewriteError(f"{info_path}: cannot read ({e})") from None
    if info.get("flavor") != "portable":
        raise RewriteError(f"{export_dir}: flavor {info.get('flavor')!r}; the rewrite is for ONNX Runtime's "
                           f"portable flavor (TensorRT fuses the trt flavor itself)")
    if "rewrite" in info:
        raise RewriteError(f"{export_dir}: already rewritten (export.json has 'rewrite'); export again to redo it")
    if not graph_path.exists():
        raise RewriteError(f"{graph_path}: not found")
    model = onnx.load(str(graph_path))
    data_names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    model, summary = rewrite_model(model)
    tmp = export_dir / ".rewrite.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES  # export's rule
        data_name = sorted(data_names)[0] if data_names else "model.onnx.data"
        onnx.save_model(model, str(tmp / "model.onnx"), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
        mode = graph_path.stat().st_mode & 0o777
        for name in ("model.onnx", data_name) if external else ("model.onnx",):
            (tmp / name).chmod(mode)  # as the export wrote them, not onnx's private default
        # Two files cannot be swapped at once: the weights go first, the graph that reads them right after.
        if external:
            os.replace(tmp / data_name, export_dir / data_name)
        os.replace(tmp / "model.onnx", graph_path)
        for name in data_names - ({data_name} if external else set()):
            (export_dir / name).unlink(missing_ok=True)
        record = {k: summary[k] for k in ("fusions", "skipped", "nodes_before", "nodes_after")}
        info["rewrite"] = record
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp / "export.json", info_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"nodes: {summary['nodes_before']} -> {summary['nodes_after']}",
             "fusions: " + ", ".join(f"{k} {v}" for k, v in summary["fusions"].items())]
    ops = sorted(set(summary["ops_before"]) | set(summary["ops_after"]))
    for op in ops:
        a, b = summary["ops_before"].get(op, 0), summary["ops_after"].get(op, 0)
        if a != b:
            lines.append(f"  {op}: {a} -> {b}")
    lines += [f"skipped ({n}x): {s}" for s, n in summary["skipped"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m export.onnx_rewrite EXPORT_DIR", file=sys.stderr)
        return 2
    try:
        summary = rewrite_export(Path(argv[0]))
    except RewriteError as e:
        print(f"onnx_rewrite: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
