"""Read a layer back from its formula: the inverse of `opsearch.graph.formula`.

A formula is what every table, log and leaderboard prints (``x / max(std_b(x), v0*x + std_i(x))``),
so it is what a user copies: `opsearch evaluate 'tanh(x) / std_b(x)'` trains it, and a benchmark
that kept only a run's log (not its study) can train the layers the run found again. Parsing a
formula gives a graph of the same function (the printer folds constant zeros and may name shared
values, ``t5 = ...; x / t5``; both read back), not necessarily the same nodes.

Grammar (the printer's precedence: ``+ -`` below ``* /``, both left-associative; a unary minus
binds to the operand after it)::

    formula := (NAME '=' sum ';')* sum
    sum     := term (('+' | '-') term)*
    term    := factor (('*' | '/') factor)*
    factor  := '-' factor | 'x' | '0' | 'v0' | 'v1' | NAME | OP '(' sum [',' sum] ')'
             | '|' sum '|' | '(' sum ')'
"""
from __future__ import annotations

import re

from opsearch.graph import NUM_INITIAL, V0, V1, X, ZERO, LayerGraph
from opsearch.ops import OPS

MAX_FORMULA_CHARS = 20_000  # a formula longer than any graph we allow (MAX_NODES) could print

_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<number>\d+(?:\.\d*)?)|(?P<sym>[-+*/(),|=;]))")
_NAME = re.compile(r"[A-Za-z_]\w*")
_INITIAL = {"x": X, "0": ZERO, "v0": V0, "v1": V1}


class FormulaError(ValueError):
    """A text that is not a layer formula; the message names the column."""


def parse_formula(text: str) -> LayerGraph:
    """The graph of a formula as `opsearch.graph.formula` prints it; FormulaError if it is not one."""
    return LayerGraph.from_tuple(parse_formula_plain(text))


def parse_formula_plain(text: str) -> tuple:
    """Like `parse_formula`, as a plain graph (a tuple of (op, inputs))."""
    if not isinstance(text, str):
        raise FormulaError(f"a formula is a string, got {type(text).__name__}")
    if len(text) > MAX_FORMULA_CHARS:
        raise FormulaError(f"formula of {len(text)} characters; the limit is {MAX_FORMULA_CHARS}")
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = _tokenize(text)
        self.pos = 0
        self.nodes: list[tuple[str, tuple[int, ...]]] = []
        self.memo: dict[tuple[str, tuple[int, ...]], int] = {}  # one node per distinct (op, inputs)
        self.names: dict[str, int] = {}

    # -- tokens ---------------------------------------------------------------------------------

    def peek(self) -> str | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        if self.pos >= len(self.tokens):
            self.fail("unexpected end", len(self.text))
        token = self.tokens[self.pos][0]
        self.pos += 1
        return token

    def expect(self, token: str) -> None:
        column = self.column()
        got = self.take()
        if got != token:
            self.fail(f"expected {token!r}, got {got!r}", column)

    def column(self) -> int:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else len(self.text)

    def fail(self, what: str, column: int):
        raise FormulaError(f"not a formula: {what} at column {column + 1} of {_clip(self.text)!r}")

    # -- nodes ----------------------------------------------------------------------------------

    def node(self, op: str, *inputs: int) -> int:
        key = (op, tuple(inputs))
        if key not in self.memo:
            self.nodes.append(key)
            self.memo[key] = NUM_INITIAL + len(self.nodes) - 1
        return self.memo[key]

    # -- grammar --------------------------------------------------------------------------------

    def parse(self) -> tuple:
        if not self.tokens:
            self.fail("empty text", 0)
        while self._at_definition():
            column = self.column()
            name = self.take()
            if name in _INITIAL or name in OPS:
                self.fail(f"{name!r} is not a free name for a shared value", column)
            self.expect("=")
            self.names[name] = self.sum()
            self.expect(";")
        out = self.sum()
        if self.pos < len(self.tokens):
            self.fail(f"unexpected {self.peek()!r}", self.column())
        if out < NUM_INITIAL or out != NUM_INITIAL + len(self.nodes) - 1:
            self.nodes.append(("add", (out, ZERO)))  # the graph's output is its last node: v + 0 is v
        return tuple(self.nodes)

    def _at_definition(self) -> bool:
        return (self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1][0] == "="
                and _NAME.fullmatch(self.tokens[self.pos][0]) is not None)

    def sum(self) -> int:
        value = self.term()
        while self.peek() in ("+", "-"):
            sign = self.take()
            right = self.term()
            value = self.node("add", value, right if sign == "+" else self.node("neg", right))
        return value

    def term(self) -> int:
        value = self.factor()
        while self.peek() in ("*", "/"):
            op = "mul" if self.take() == "*" else "div"
            value = self.node(op, value, self.factor())
        return value

    def factor(self) -> int:
        column = self.column()
        token = self.take()
        if token == "-":
            return self.node("neg", self.factor())
        if token == "(":
            value = self.sum()
            self.expect(")")
            return value
        if token == "|":
            value = self.sum()
            self.expect("|")
            return self.node("abs", value)
        if token in _INITIAL:
            return _INITIAL[token]
        if token in self.names:
            return self.names[token]
        if token in OPS or (self.peek() == "(" and _NAME.fullmatch(token)):
            return self.call(token, column)
        if re.fullmatch(r"\d+(\.\d*)?", token):
            self.fail(f"the only number a layer has is 0, got {token}", column)
        if _NAME.fullmatch(token):
            self.fail(f"unknown name {token!r} (values: x, 0, v0, v1)", column)
        self.fail(f"unexpected {token!r}", column)

    def call(self, name: str, column: int) -> int:
        spec = OPS.get(name)
        if spec is None:
            self.fail(f"unknown op {name!r}", column)
        self.expect("(")
        args = [self.sum()]
        while self.peek() == ",":
            self.take()
            args.append(self.sum())
        self.expect(")")
        if len(args) != spec.arity:
            self.fail(f"{name} takes {spec.arity} argument(s), got {len(args)}", column)
        return self.node(name, *args)


def _tokenize(text: str) -> list[tuple[str, int]]:
    tokens: list[tuple[str, int]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None:
            column = len(text) - len(text[pos:].lstrip())
            raise FormulaError(f"not a formula: unexpected {text[column]!r} at column {column + 1} "
                               f"of {_clip(text)!r}")
        token = m.group("name") or m.group("number") or m.group("sym")
        tokens.append((token, m.start(m.lastgroup)))
        pos = m.end()
    return tokens


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
