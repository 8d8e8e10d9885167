"""A fast, flat view of a pyglove search space: genomes are tuples of ints.

pyglove 0.4.5 needs milliseconds to sample, convert or materialise one DNA, which would dominate
the engine's per-candidate budget (BENCHMARKS.md, "Engine overhead"). `SearchSpace` compiles the hyper-value's DNA spec once into a
list of categorical genes (a `pg.oneof` is one gene, a `pg.manyof(k, ...)` is k genes, one per
pick, in pyglove's own order), so that sampling, mutation and decoding cost microseconds. A
genome is exactly the list `pg.DNA.to_numbers()` gives for the same choice, so `to_dna`/`from_dna`
convert losslessly and the equality ``decode(g) == pg.materialize(hv, to_dna(g)).as_tuple()``
holds (checked once at construction; a mismatch disables the fast path).

Supported: categorical decisions (`pg.oneof`, `pg.manyof` with any distinct/sorted flags) whose
candidates are plain values. Float decisions and conditional (nested) spaces raise UserError.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import pyglove as pg

from opsearch.errors import UserError
from opsearch.graph import NUM_INITIAL as NUM_INITIAL_VALUES
from opsearch.graph import LayerGraph, Node

Genome = tuple  # tuple[int, ...]

_NODE_PATH = re.compile(r"^nodes\[(\d+)\]\.(op|inputs)\b")
_PLAIN_TYPES = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class GeneGroup:
    """One pyglove `Choices` decision: `count` consecutive genes starting at `start`."""

    start: int
    count: int
    size: int
    distinct: bool
    sorted: bool
    location: str

    @property
    def constrained(self) -> bool:
        return self.count > 1 and (self.distinct or self.sorted)

    @property
    def genes(self) -> range:
        return range(self.start, self.start + self.count)


class SearchSpace:
    """Flat categorical view of a pyglove hyper-value (see module docstring)."""

    def __init__(self, hyper_value: Any, name: str | None = None, *, require_layer_graph: bool = False):
        self.name = name or type(hyper_value).__name__
        self.hyper_value = hyper_value
        label = f"search space {self.name!r}"
        if not isinstance(hyper_value, pg.Symbolic):
            raise UserError(f"{label} is a {type(hyper_value).__name__}, not a pyglove symbolic "
                            f"value with pg.oneof/pg.manyof decisions (e.g. a LayerGraph)")
        try:
            self.dna_spec = pg.dna_spec(hyper_value)
        except Exception as e:  # pyglove raises assorted types for malformed values
            raise UserError(f"{label}: pyglove cannot build a DNA spec: {type(e).__name__}: {e}") from e
        self.groups: tuple[GeneGroup, ...] = self._compile_groups(label)
        sizes: list[int] = []
        locations: list[str] = []
        for group in self.groups:
            sizes.extend([group.size] * group.count)
            locations.extend([group.location] * group.count)
        self.gene_sizes: tuple[int, ...] = tuple(sizes)
        self.gene_locations: tuple[str, ...] = tuple(locations)
        self.num_genes = len(sizes)
        self._group_of_gene = tuple(i for i, g in enumerate(self.groups) for _ in range(g.count))
        self._unconstrained = not any(g.constrained for g in self.groups)

        first = self.dna_spec.first_dna()
        sample = pg.materialize(hyper_value, first)
        self.is_layer_graph = isinstance(sample, LayerGraph)
        if require_layer_graph and not self.is_layer_graph:
            raise UserError(f"{label} materialises to a {type(sample).__name__}, not a LayerGraph")
        self.num_nodes = len(sample.nodes) if self.is_layer_graph else 0

        self._plan = self._compile_plan() if self.is_layer_graph else None
        if self._plan is not None and self._decode_plan(tuple(first.to_numbers())) != sample.as_tuple():
            self._plan = None  # an unexpected shape: stay correct, use the slow path
        self.node_of_gene: tuple[int | None, ...] = self._compute_node_of_gene()
        self.gene_field: tuple[str | None, ...] = tuple(
            (m.group(2) if (m := _NODE_PATH.match(loc)) else None) if self.is_layer_graph else None
            for loc in self.gene_locations)
        # which input position of its node a gene sets (None: op genes, whole-list choices, or
        # spaces without the fast path), so mutation can skip inputs a unary op ignores
        input_position: list[int | None] = [None] * self.num_genes
        for _, in_slots in self._plan or ():
            for position, (kind, ref, _values) in enumerate(in_slots):
                if kind == "g" and all(k != "t" for k, _, _ in in_slots):
                    input_position[ref] = position
        self.input_position: tuple[int | None, ...] = tuple(input_position)
        genes_of_node: list[list[int]] = [[] for _ in range(self.num_nodes)]
        for gene, node in enumerate(self.node_of_gene):
            if node is not None:
                genes_of_node[node].append(gene)
        self.genes_of_node: tuple[tuple[int, ...], ...] = tuple(tuple(g) for g in genes_of_node)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_name(cls, name: str, **options: Any) -> "SearchSpace":
        """Build the registered search space `name` with its options (e.g. num_nodes=8)."""
        from opsearch import registry

        hyper_value = registry.search_spaces.create(name, **options)
        return cls(hyper_value, name=name, require_layer_graph=True)

    def _compile_groups(self, label: str) -> tuple[GeneGroup, ...]:
        groups: list[GeneGroup] = []
        start = 0
        for element in self.dna_spec.elements:
            if isinstance(element, pg.geno.Float):
                raise UserError(f"{label}: float decisions ({element.id}) are not supported; "
                                f"use pg.oneof over a few values")
            if not isinstance(element, pg.geno.Choices):
                raise UserError(f"{label}: decision {element.id} of type {type(element).__name__} "
                                f"is not supported (only pg.oneof / pg.manyof)")
            if any(candidate.elements for candidate in element.candidates):
                raise UserError(f"{label}: conditional (nested) decisions under {element.id or '(root)'} are "
                                f"not supported; flatten the space")
            size = len(element.candidates)
            count = element.num_choices
            if element.distinct and count > size:
                raise UserError(f"{label}: {element.id} picks {count} distinct of {size}")
            groups.append(GeneGroup(start, count, size, bool(element.distinct and count > 1),
                                    bool(element.sorted and count > 1), str(element.id)))
            start += count
        return tuple(groups)

    def _compile_plan(self):
        """Per node, where its op and inputs come from: ("const", value) or (gene, values)."""
        hv = self.hyper_value
        if type(hv) is not LayerGraph:
            return None
        nodes = hv.sym_init_args.nodes
        if not isinstance(nodes, list) or isinstance(nodes, pg.hyper.HyperValue):
            return None
        gene_start = {g.location: g for g in self.groups}

        def choice_slot(value):
            group = gene_start.get(str(value.sym_path))
            if group is None:
                return None
            values = [_plain(c) for c in value.candidates]
            if any(v is _NOT_PLAIN for v in values):
                return None
            return group, tuple(values)

        plan = []
        for node in nodes:
            if type(node) is not Node:
                return None
            op = node.sym_init_args.op
            if isinstance(op, str):
                op_slot = (-1, op)
            elif isinstance(op, pg.hyper.OneOf):
                found = choice_slot(op)
                if found is None or not all(isinstance(v, str) for v in found[1]):
                    return None
                op_slot = (found[0].start, found[1])
            else:
                return None
            inputs = node.sym_init_args.inputs
            # input slots: ("c", int) | ("g", gene, values) | ("t", gene, tuple-values)
            if isinstance(inputs, pg.hyper.ManyOf):
                found = choice_slot(inputs)
                if found is None or not all(isinstance(v, int) for v in found[1]):
                    return None
                in_slots = tuple(("g", gene, found[1]) for gene in found[0].genes)
            elif isinstance(inputs, pg.hyper.OneOf):
                found = choice_slot(inputs)
                if found is None or not all(isinstance(v, tuple) for v in found[1]):
                    return None
                in_slots = (("t", found[0].start, found[1]),)
            elif isinstance(inputs, list):
                slots = []
                for item in inputs:
                    if isinstance(item, int) and not isinstance(item, bool):
                        slots.append(("c", item, None))
                    elif isinstance(item, pg.hyper.OneOf):
                        found = choice_slot(item)
                        if found is None or not all(isinstance(v, int) for v in found[1]):
                            return None
                        slots.append(("g", found[0].start, found[1]))
                    else:
                        return None
                in_slots = tuple(slots)
            else:
                return None
            plan.append((op_slot, in_slots))
        return tuple(plan)

    def _compute_node_of_gene(self) -> tuple[int | None, ...]:
        if not self.is_layer_graph:
            return (None,) * self.num_genes
        out: list[int | None] = []
        for location in self.gene_locations:
            m = _NODE_PATH.match(location)
            out.append(int(m.group(1)) if m else None)
        return tuple(out)

    # ------------------------------------------------------------------ genomes

    @property
    def has_fast_decode(self) -> bool:
        return self._plan is not None

    @property
    def can_encode(self) -> bool:
        """Whether `encode` can work at all (a plan, no constrained picks): mutations that
        rebuild a graph (insert or delete a node) need it."""
        return self._plan is not None and not any(g.constrained for g in self.groups)

    @property
    def node_ops(self) -> tuple[str, ...]:
        """Every op some node of a LayerGraph space can take (empty without a plan)."""
        if self._plan is None:
            return ()
        seen: dict[str, None] = {}
        for (op_gene, op_values), _slots in self._plan:
            for op in ((op_values,) if op_gene < 0 else op_values):
                seen.setdefault(op, None)
        return tuple(seen)

    @property
    def size(self) -> int:
        """Number of distinct genomes (pyglove's space_size)."""
        return self.dna_spec.space_size

    def random_genome(self, rng: random.Random) -> Genome:
        """A uniform random genome (honouring distinct/sorted picks)."""
        rand = rng.random
        if self._unconstrained:
            return tuple([int(rand() * n) for n in self.gene_sizes])
        genes: list[int] = []
        for group in self.groups:
            if group.distinct:
                picks = rng.sample(range(group.size), group.count)
            else:
                picks = [int(rand() * group.size) for _ in range(group.count)]
            if group.sorted:
                picks.sort()
            genes.extend(picks)
        return tuple(genes)

    def is_valid(self, genome: Sequence[int]) -> bool:
        if len(genome) != self.num_genes:
            return False
        for value, size in zip(genome, self.gene_sizes):
            if type(value) is not int or not 0 <= value < size:
                return False
        if not self._unconstrained:
            for group in self.groups:
                if group.constrained:
                    picks = genome[group.start:group.start + group.count]
                    if group.distinct and len(set(picks)) != len(picks):
                        return False
                    if group.sorted and list(picks) != sorted(picks):
                        return False
        return True

    def check_genome(self, genome: Iterable[int]) -> Genome:
        """`genome` as a tuple; UserError if it does not fit this space (e.g. another space's)."""
        try:
            genome = tuple(int(v) if not isinstance(v, bool) else v for v in genome)
        except (TypeError, ValueError):
            raise UserError(f"genome {genome!r} is not a list of integers") from None
        if not self.is_valid(genome):
            raise UserError(f"genome {list(genome)} does not fit search space {self.name!r} "
                            f"({self.num_genes} genes with sizes {list(self.gene_sizes)})")
        return genome

    def repair(self, genome: Sequence[int]) -> Genome:
        """Nearest valid genome for independently drawn genes: clamp, de-duplicate, sort picks."""
        if len(genome) != self.num_genes:
            raise ValueError(f"genome has {len(genome)} genes, search space {self.name!r} has {self.num_genes}")
        genes = [min(max(int(v), 0), n - 1) for v, n in zip(genome, self.gene_sizes)]
        for group in self.groups:
            if not group.constrained:
                continue
            picks = genes[group.start:group.start + group.count]
            if group.distinct:
                seen: set[int] = set()
                taken = set(picks)
                free = iter(v for v in range(group.size) if v not in taken)
                for i, v in enumerate(picks):
                    if v in seen:
                        picks[i] = next(free)
                    seen.add(picks[i])
            if group.sorted:
                picks.sort()
            genes[group.start:group.start + group.count] = picks
        return tuple(genes)

    def resample_gene(self, genes: list[int], gene: int, rng: random.Random) -> bool:
        """Set `genes[gene]` to a different value, in place, keeping the group's constraints.

        Returns False when no different valid value exists (a size-1 gene, or a full distinct
        pick). With sorted picks the new value may land at another position of the group.
        """
        size = self.gene_sizes[gene]
        if size < 2:
            return False
        group = self.groups[self._group_of_gene[gene]]
        current = genes[gene]
        if not group.constrained:
            value = int(rng.random() * (size - 1))
            genes[gene] = value + (value >= current)
            return True
        picks = genes[group.start:group.start + group.count]
        if group.distinct:
            used = set(picks)
            options = [v for v in range(size) if v not in used]
            if not options:
                if group.sorted:
                    return False
                others = [g for g in group.genes if g != gene]
                other = others[int(rng.random() * len(others))]
                genes[gene], genes[other] = genes[other], genes[gene]
                return True
        else:
            options = [v for v in range(size) if v != current]
        genes[gene] = options[int(rng.random() * len(options))]
        if group.sorted:
            genes[group.start:group.start + group.count] = sorted(genes[group.start:group.start + group.count])
            if genes[group.start:group.start + group.count] == sorted(picks):
                return False
        return True

    def redraw_genes(self, genes: list[int], which: Iterable[int], rng: random.Random) -> None:
        """Draw fresh uniform values for the genes `which`, in place, keeping constraints.

        A constrained group covered entirely is redrawn as a whole (distinct/sorted); one
        covered partly has each of its listed genes resampled. The result may equal the input.
        """
        which = sorted(set(which))
        seen_groups: set[int] = set()
        for gene in which:
            index = self._group_of_gene[gene]
            group = self.groups[index]
            if not group.constrained:
                genes[gene] = int(rng.random() * group.size)
                continue
            if index in seen_groups:
                continue
            seen_groups.add(index)
            members = [g for g in group.genes if g in which]
            if len(members) == group.count:
                picks = (rng.sample(range(group.size), group.count) if group.distinct
                         else [int(rng.random() * group.size) for _ in range(group.count)])
                if group.sorted:
                    picks.sort()
                genes[group.start:group.start + group.count] = picks
            else:
                for g in members:
                    self.resample_gene(genes, g, rng)

    # ------------------------------------------------------------------ decoding

    def decode(self, genome: Sequence[int]) -> Any:
        """The candidate for `genome`: a plain graph tuple for LayerGraph spaces.

        Fast path (no pyglove) for LayerGraph spaces with oneof/manyof in op and inputs;
        otherwise pg.materialize (slow, ~7 ms), as_tuple() when the result is a LayerGraph.
        """
        if self._plan is not None:
            return self._decode_plan(genome)
        value = pg.materialize(self.hyper_value, self.to_dna(genome))
        return value.as_tuple() if isinstance(value, LayerGraph) else value

    def encode(self, graph: Any) -> Genome | None:
        """A genome that decodes to a graph computing `graph` (same canonical hash), or None.

        Lets known layers seed a search (their evaluated baselines become the first members of
        an evolving population). The graph's live nodes go to the last positions, the positions
        before them get the first choice of every gene (dead: the output does not read them).
        None when the space cannot express the graph (an op it lacks, too few nodes, inputs a
        gene cannot take, constrained picks).
        """
        from opsearch import graph as graph_mod

        if self._plan is None or any(g.constrained for g in self.groups):
            return None
        try:
            target = graph_mod.prune(graph)
            want = graph_mod.canonical_hash(target)
        except Exception:
            return None
        n, k = len(self._plan), len(target)
        if k > n:
            return None
        shift = n - k
        genes = [0] * self.num_genes
        for offset, (op, inputs) in enumerate(target):
            (op_gene, op_values), in_slots = self._plan[shift + offset]
            if op_gene < 0:
                if op_values != op:
                    return None
            elif op in op_values:
                genes[op_gene] = op_values.index(op)
            else:
                return None
            wanted = [i if i < NUM_INITIAL_VALUES else i + shift for i in inputs]
            for position, (kind, ref, values) in enumerate(in_slots):
                value = wanted[position] if position < len(wanted) else None
                if kind == "c":
                    if value is not None and ref != value:
                        return None
                elif kind == "g":
                    if value is not None:
                        if value not in values:
                            return None
                        genes[ref] = values.index(value)
                else:
                    return None
        genome = tuple(genes)
        try:
            return genome if graph_mod.canonical_hash(self.decode(genome)) == want else None
        except Exception:
            return None

    def _decode_plan(self, genome: Sequence[int]) -> tuple:
        out = []
        for (op_gene, op_values), in_slots in self._plan:
            op = op_values if op_gene < 0 else op_values[genome[op_gene]]
            inputs: list[int] = []
            for kind, ref, values in in_slots:
                if kind == "g":
                    inputs.append(values[genome[ref]])
                elif kind == "c":
                    inputs.append(ref)
                else:
                    inputs.extend(values[genome[ref]])
            out.append((op, tuple(inputs)))
        return tuple(out)

    def materialize(self, genome: Sequence[int]) -> Any:
        """The symbolic candidate (e.g. a LayerGraph) through pyglove: slow, not for hot loops."""
        return pg.materialize(self.hyper_value, self.to_dna(genome))

    def to_dna(self, genome: Sequence[int]) -> pg.DNA:
        """The pyglove DNA (spec attached) for `genome`: ~10 ms, pyglove's own cost."""
        genome = [int(v) for v in genome]
        if len(self.groups) < 2:  # a lone manyof's nested form would be ambiguous
            return pg.DNA.from_numbers(genome, self.dna_spec)
        # Nested construction + use_spec is about twice as fast as DNA.from_numbers.
        nested = [genome[g.start] if g.count == 1 else genome[g.start:g.start + g.count]
                  for g in self.groups]
        return pg.DNA(nested).use_spec(self.dna_spec)

    def from_dna(self, dna: pg.DNA) -> Genome:
        return self.check_genome(dna.to_numbers())

    @staticmethod
    def genome_to_json(genome: Sequence[int]) -> str:
        return json.dumps([int(v) for v in genome])

    def genome_from_json(self, text: str) -> Genome:
        """Parse a stored genome (plain JSON list; never pickle) and check it fits this space."""
        try:
            value = json.loads(text)
        except (TypeError, ValueError) as e:
            raise UserError(f"stored genome is not JSON: {e}") from None
        if not isinstance(value, list):
            raise UserError(f"stored genome is not a JSON list: {text[:80]!r}")
        return self.check_genome(value)

    def __repr__(self) -> str:
        return (f"SearchSpace({self.name!r}, genes={self.num_genes}, nodes={self.num_nodes}, "
                f"size={self.size:.3g}, fast_decode={self.has_fast_decode})")


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """A candidate as a plain Python value (lists -> tuples), or _NOT_PLAIN for symbolic objects."""
    if isinstance(value, _PLAIN_TYPES):
        return value
    if isinstance(value, (list, tuple)):
        items = tuple(_plain(v) for v in value)
        return _NOT_PLAIN if any(v is _NOT_PLAIN for v in items) else items
    return _NOT_PLAIN


__all__ = ["Genome", "GeneGroup", "SearchSpace"]
