"""Graph-aware mutation shared by the evolutionary algorithms.

Most genes of a layer graph are dead: a node the output does not depend on, or the second input
of a unary op, can change without changing the layer, and a mutation spent there is an
evaluation wasted on a duplicate. So a mutation picks a *live* node (graph.live_nodes on the
decoded parent) and applies one of the paper's three kinds (reconstructed): change the node's
op, change one input the op actually reads, or replace the node (all its genes redrawn). When
the child's canonical hash equals the parent's (e.g. `add(a, b)` -> `add(b, a)`), it retries a
few times; given the set of canonical hashes already evaluated (`seen`), it also retries
children that would only repeat an earlier candidate (the engine would not train them again,
but the step would be wasted and the copy would crowd the population), and children whose
output no longer depends on x (the validity filter would reject them). Spaces that are not
LayerGraphs get a plain one-gene uniform mutation.

Two more kinds change a graph's size: `insert` puts a new node on one edge the output depends on
(`u -> c` becomes `u -> op(u, r) -> c`, the output edge included, r any value before it) and
`delete` removes a live node (its readers read one of its inputs instead). Editing genes in
place cannot grow a layer: from scratch, evolution found `x / std_b(x)` and stayed there, while
`max(x / std_b(x), 0)` is one insertion away but two or more gene edits (a free node must take
the division and the output must move to a new `max`). `self` inserts two nodes on one live edge,
`u -> op(u, f(u)) -> c` (op binary, f unary, both drawn from the space's ops; u first or second):
a value combined with a function of itself, the shape of normalization (`u / std_b(u)`) and of
self-gating (`u * sigmoid(u)`, `max(u, tanh(u))`). From scratch the first layers that train are
element-wise (`sqrt(x)`, `tanh(x)`), and plain insertions reach a normalizer of them only in two
steps, the first of which (`u / v0`, `u * std_b(x)`) rarely trains: round 5's seed 0 spent 700 CPU
seconds mutating `-sqrt(x)` before an immigrant brought `x / std_l(x)`. The three rebuild the
pruned graph and pack it into the space with `SearchSpace.encode`; spaces it cannot encode do not
get them.
"""
from __future__ import annotations

import random
from typing import Any

from opsearch import graph, ops
from opsearch.algorithm import Option
from opsearch.errors import UserError
from opsearch.plugins.algorithms.generator import graph_hash
from opsearch.space import Genome, SearchSpace

MUTATION_OPTIONS: dict[str, Option] = {
    "mutate_op": Option(1.0, "relative weight of 'change a live node's op' mutations", float, minimum=0.0),
    "mutate_input": Option(1.0, "relative weight of 'change one input a live node reads'", float, minimum=0.0),
    "mutate_node": Option(1.0, "relative weight of 'replace a live node (op and inputs)'", float, minimum=0.0),
    "mutate_insert": Option(1.0, "relative weight of 'insert a new node on a live edge' (graph grows)",
                            float, minimum=0.0),
    "mutate_delete": Option(1.0, "relative weight of 'delete a live node, its readers read one of its "
                            "inputs' (graph shrinks)", float, minimum=0.0),
    "mutate_self": Option(1.0, "relative weight of 'insert u -> op(u, f(u)) on a live edge': a value "
                          "combined with a unary function of itself, e.g. u / std_b(u) (graph grows by two)",
                          float, minimum=0.0),
    "live_only": Option(True, "mutate only nodes/inputs the output depends on (false: any gene)", bool),
    "retries": Option(8, "extra tries when the child is structurally the parent or (avoid_duplicates) "
                      "an already evaluated graph (same canonical hash)", int, minimum=0, maximum=100),
    "avoid_duplicates": Option(True, "retry mutations that repeat an evaluated graph (canonical hash)", bool),
}

KINDS = ("op", "input", "node", "insert", "delete", "self")
MUTATION_KINDS = ("edit", *KINDS[3:])  # GraphMutator.last_kind: op, input and node are one "edit"


class GraphMutator:
    """Child genomes from a parent genome (see module docstring)."""

    def __init__(self, space: SearchSpace, mutate_op: float = 1.0, mutate_input: float = 1.0,
                 mutate_node: float = 1.0, mutate_insert: float = 1.0, mutate_delete: float = 1.0,
                 mutate_self: float = 1.0, live_only: bool = True, retries: int = 8, avoid_duplicates: bool = True):
        self.space = space
        self.weights = (float(mutate_op), float(mutate_input), float(mutate_node))
        if sum(self.weights) + float(mutate_insert) + float(mutate_delete) + float(mutate_self) <= 0:
            raise UserError("mutation weights mutate_op + mutate_input + mutate_node + mutate_insert "
                            "+ mutate_delete + mutate_self must be > 0")
        self.live_only = live_only
        self.retries = retries
        # the kind of mutation that made the last child (edit, insert, delete, self; resample for
        # spaces that are not layer graphs; None when it returned the parent unchanged)
        self.last_kind: str | None = None
        self.avoid_duplicates = avoid_duplicates
        self.graph_aware = space.is_layer_graph and space.num_nodes > 0 and any(
            n is not None for n in space.node_of_gene)
        self.mutable_genes = tuple(g for g, n in enumerate(space.gene_sizes) if n > 1)
        if self.graph_aware:
            self._op_genes = tuple(tuple(g for g in genes if space.gene_field[g] == "op" and space.gene_sizes[g] > 1)
                                   for genes in space.genes_of_node)
            self._input_genes = tuple(
                tuple(g for g in genes if space.gene_field[g] == "inputs" and space.gene_sizes[g] > 1)
                for genes in space.genes_of_node)
            self._node_genes = tuple(tuple(g for g in genes if space.gene_sizes[g] > 1)
                                     for genes in space.genes_of_node)
        # insert / delete / self rebuild the graph and need SearchSpace.encode to pack it back
        rebuild = self.graph_aware and space.can_encode and bool(space.node_ops)
        self._ops = space.node_ops if rebuild else ()
        self._unary = tuple(o for o in self._ops if _arity(o) == 1)
        self._binary = tuple(o for o in self._ops if _arity(o) == 2)
        self_weight = float(mutate_self) if self._unary and self._binary else 0.0
        self.size_weights = (float(mutate_insert), float(mutate_delete), self_weight) if rebuild else (0.0, 0.0, 0.0)
        if sum(self.weights) <= 0 and sum(self.size_weights) <= 0:
            raise UserError("mutation: only mutate_insert / mutate_delete / mutate_self have weight, and "
                            "this space cannot rebuild graphs (SearchSpace.encode) or lacks unary and binary "
                            "ops; give an edit kind weight")

    @classmethod
    def from_options(cls, space: SearchSpace, options: dict[str, Any]) -> "GraphMutator":
        return cls(space, **{k: options[k] for k in MUTATION_OPTIONS})

    def mutate(self, parent: Genome, rng: random.Random, seen: set[str] | frozenset = frozenset()) -> Genome:
        """A child differing from `parent`: functionally, and from the hashes in `seen`, where
        `retries` extra tries find one (else the last child that differs at all)."""
        self.last_kind = None
        if not self.mutable_genes:
            return tuple(parent)
        if not self.graph_aware:
            genes = list(parent)
            self.space.resample_gene(genes, self.mutable_genes[int(rng.random() * len(self.mutable_genes))], rng)
            self.last_kind = "resample"
            return tuple(genes)
        parent = tuple(parent)
        plain = self.space.decode(parent)
        live = self._live(plain)
        parent_hash = canonical_hash(plain) if self.retries else None
        best, best_kind = parent, None
        for _ in range(self.retries + 1):
            child, kind = self._mutate_once(parent, plain, live, rng)
            if child == parent:
                continue
            child_plain = self.space.decode(child)
            if not _is_valid(child_plain):  # rejected for free, but the step would be lost
                if best == parent:
                    best, best_kind = child, kind
                continue
            best, best_kind = child, kind
            if parent_hash is None:
                break
            child_hash = canonical_hash(child_plain)
            if child_hash is None or (child_hash != parent_hash and child_hash not in seen):
                break
        self.last_kind = best_kind
        return best

    def hash_of(self, genome: Genome) -> str | None:
        """Canonical hash of a genome's graph (None for non-graph spaces or invalid graphs)."""
        return graph_hash(self.space, genome) if self.graph_aware else None

    # ------------------------------------------------------------------ internals

    def _live(self, plain) -> list[int]:
        nodes = range(self.space.num_nodes)
        if not self.live_only:
            return [k for k in nodes if self._node_genes[k]]
        try:
            live = sorted(graph.live_nodes(plain))
        except (ValueError, KeyError, IndexError, TypeError):
            live = []
        live = [k for k in live if 0 <= k < self.space.num_nodes and self._node_genes[k]]
        return live or [k for k in nodes if self._node_genes[k]]

    def _read_input_genes(self, node: int, op: str) -> tuple[int, ...]:
        """Input genes of `node` whose input position the op reads (all of them if unknown)."""
        genes = self._input_genes[node]
        if not self.live_only:
            return genes
        arity = _arity(op)
        if arity is None:
            return genes
        read = tuple(g for g in genes if (p := self.space.input_position[g]) is None or p < arity)
        return read

    def _keep_unread_inputs(self, genes: list[int], parent: Genome, node: int) -> None:
        """After replacing `node`, leave inputs its new op ignores as they were (no dead churn)."""
        if not self.live_only:
            return
        arity = _arity(self.space.decode(genes)[node][0])
        if arity is None:
            return
        before = list(genes)
        for g in self._input_genes[node]:
            position = self.space.input_position[g]
            if position is not None and position >= arity:
                genes[g] = parent[g]
        if not self.space.is_valid(genes):  # restoring broke a distinct/sorted pick
            genes[:] = before

    def _mutate_once(self, parent: Genome, plain, live: list[int], rng: random.Random) -> tuple[Genome, str]:
        """One mutation of a kind drawn by weight, and the kind; the parent itself when it found
        nothing to do."""
        edit, (insert, delete, self_) = sum(self.weights), self.size_weights
        grow = insert + delete + self_
        r = rng.random() * (edit + grow) if grow > 0 else 0.0
        if r < edit:
            return self._edit(parent, plain, live, rng), "edit"
        if r < edit + insert:
            child, kind = self._insert(plain, rng), "insert"
        elif r < edit + insert + delete:
            child, kind = self._delete(plain, rng), "delete"
        else:
            child, kind = self._insert_self(plain, rng), "self"
        return (child if child is not None else tuple(parent)), kind

    def _insert(self, plain, rng: random.Random) -> Genome | None:
        """`u -> c` becomes `u -> op(u, r) -> c` on a random live edge (or after the output)."""
        def node(k: int, u: int) -> list:
            op = self._ops[int(rng.random() * len(self._ops))]
            before = graph.NUM_INITIAL + k  # values the new node may read: initial ones and nodes < k
            r = int(rng.random() * before)
            return [(op, (u,) if _arity(op) == 1 else ((u, r) if rng.random() < 0.5 else (r, u)))]

        return self._insert_on_edge(plain, rng, node)

    def _insert_self(self, plain, rng: random.Random) -> Genome | None:
        """`u -> c` becomes `u -> op(u, f(u)) -> c` (or `op(f(u), u)`) on a random live edge."""
        def pair(k: int, u: int) -> list:
            f = self._unary[int(rng.random() * len(self._unary))]
            op = self._binary[int(rng.random() * len(self._binary))]
            fu = graph.NUM_INITIAL + k
            return [(f, (u,)), (op, (u, fu) if rng.random() < 0.5 else (fu, u))]

        return self._insert_on_edge(plain, rng, pair)

    def _insert_on_edge(self, plain, rng: random.Random, new_nodes) -> Genome | None:
        """The pruned graph with `new_nodes(k, u)` spliced into a random live edge `u -> node k`."""
        nodes = _pruned(plain)
        if nodes is None:
            return None
        k, p, u = _live_edge(nodes, rng)
        return self.space.encode(_splice(nodes, k, p, new_nodes(k, u)))

    def _delete(self, plain, rng: random.Random) -> Genome | None:
        """A random live node removed; its readers read one of its inputs (the output: that input)."""
        nodes = _pruned(plain)
        if nodes is None:
            return None
        n = len(nodes)
        if n < 2:
            return None
        k = int(rng.random() * n)
        reads = nodes[k][1]
        gone = graph.NUM_INITIAL + k
        if k == n - 1:  # the output moves to one of its input nodes; what only it read dies
            inner = [v for v in reads if v >= graph.NUM_INITIAL]
            if not inner:
                return None
            keep = inner[int(rng.random() * len(inner))]
            return self.space.encode(tuple(nodes[:keep - graph.NUM_INITIAL + 1]))
        repl = reads[int(rng.random() * len(reads))]
        rebuilt = [(o, tuple(repl if v == gone else (v - 1 if v > gone else v) for v in ins))
                   for j, (o, ins) in enumerate(nodes) if j != k]
        return self.space.encode(tuple(rebuilt))

    def _edit(self, parent: Genome, plain, live: list[int], rng: random.Random) -> Genome:
        """Change one live node in place: its op, one input it reads, or all its genes."""
        space = self.space
        genes = list(parent)
        for _ in range(8):  # a chosen (kind, node) may have nothing to change; draw again
            node = live[int(rng.random() * len(live))]
            op = plain[node][0]
            options = (self._op_genes[node], self._read_input_genes(node, op), self._node_genes[node])
            weights = [w if opts else 0.0 for w, opts in zip(self.weights, options)]
            total = sum(weights)
            if total <= 0:
                continue
            r = rng.random() * total
            kind = 0 if r < weights[0] else (1 if r < weights[0] + weights[1] else 2)
            if kind == 2:
                for _attempt in range(4):
                    space.redraw_genes(genes, options[2], rng)
                    self._keep_unread_inputs(genes, parent, node)
                    if genes != list(parent):
                        return tuple(genes)
                    genes = list(parent)
                continue
            choices = options[kind]
            if space.resample_gene(genes, choices[int(rng.random() * len(choices))], rng):
                return tuple(genes)
        return tuple(genes)


def _arity(op: str) -> int | None:
    spec = ops.OPS.get(op) if isinstance(op, str) else None
    return getattr(spec, "arity", None) if spec is not None else None


def _live_edge(nodes: list, rng: random.Random) -> tuple[int, int | None, int]:
    """A random edge the output depends on, as (reader k, input position p, value u); the output
    edge is (len(nodes), None, last node): what is inserted there becomes the output."""
    n = len(nodes)
    edges = [(k, p) for k, (_op, inputs) in enumerate(nodes) for p in range(len(inputs))]
    edges.append((n, None))
    k, p = edges[int(rng.random() * len(edges))]
    return k, p, (nodes[k][1][p] if p is not None else graph.NUM_INITIAL + n - 1)


def _splice(nodes: list, k: int, p: int | None, new_nodes: list) -> tuple:
    """`nodes` with `new_nodes` placed before node k (later references shifted); node k's input p
    (if any) then reads the last new node instead."""
    first, m = graph.NUM_INITIAL + k, len(new_nodes)

    def shift(v: int) -> int:
        return v + m if v >= first else v

    rebuilt = nodes[:k] + list(new_nodes) + [(o, tuple(shift(v) for v in ins)) for o, ins in nodes[k:]]
    if p is not None:
        o, ins = rebuilt[k + m]
        rebuilt[k + m] = (o, ins[:p] + (first + m - 1,) + ins[p + 1:])
    return tuple(rebuilt)


def _pruned(plain) -> list | None:
    """The graph's live nodes, renumbered (graph.prune), or None for a graph it cannot read."""
    try:
        return list(graph.prune(plain))
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _is_valid(plain) -> bool:
    try:
        return graph.is_valid(plain)
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def canonical_hash(plain) -> str | None:
    """graph.canonical_hash, or None for a graph it cannot hash (unknown op, bad index)."""
    try:
        return graph.canonical_hash(plain)
    except (ValueError, KeyError, IndexError, TypeError):
        return None


__all__ = ["GraphMutator", "MUTATION_OPTIONS", "KINDS"]
