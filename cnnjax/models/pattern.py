"""The lecture's ConvNet pattern as a tiny language: text -> a working model.

Grammar (case-insensitive names, whitespace ignored)::

    pattern := [INPUT ARROW] sequence
    sequence:= item (ARROW item)*
    item    := layer ['?'] | '[' sequence ']' [REPEAT count] ['?']
    layer   := NAME ['(' arg (',' arg)* ')']
    arg     := NUMBER | SIZE | NAME | NAME '=' (NUMBER | SIZE | NAME)
    ARROW   := '->' | '→'          REPEAT := '*' | '×' | '↕' | '↗'
    SIZE    := INT 'x' INT  (e.g. 3x3; '×' also accepted)
    count   := INT | NAME       (a NAME is looked up in ``repeats``, e.g. N, M, K)

A group without a count runs once; a count of 0 drops it (``N = M = K = 0``
gives the lecture's linear classifier ``INPUT -> FC``). A trailing ``?`` marks
an optional item (the lecture's ``POOL?``), built only when ``optional=True``.

Layers and their defaults (written to make the lecture's bare examples work):

* ``CONV(K, FxF, [act], s=S, p=P|same|valid, d=D)`` — default ``CONV`` is
  ``CONV(32, 3x3, p=same)``. Padding defaults to "same" (TensorFlow's SAME, which
  for a stride-1 3x3 conv is padding 1) so stacks of 3x3 convs keep their size,
  as in VGG; write ``p=0`` / ``valid`` for LeNet-style shrinking convs. An
  activation name (``relu``, ``tanh``) in the arguments is fused into the layer.
* ``RELU``, ``TANH``, ``SIGMOID``, ``SOFTMAX`` — activation layers.
* ``POOL(F[, S])`` = ``MAXPOOL`` / ``MAX_POOL`` (default ``POOL(2)``: 2x2 stride 2),
  ``AVGPOOL`` / ``AVG_POOL``, ``L2POOL``; ``GAP`` global average pooling.
* ``FC(N[, act])`` — a dense layer; a Flatten is inserted before the first FC
  that reads a feature map. A bare ``FC`` is a hidden layer of 128 units, except
  the last FC of the pattern, which has ``num_classes`` units.
* ``DROPOUT(r)`` (default 0.5), ``LRN(size=5, k=2, alpha=1e-4, beta=0.75)``.

Layers are named by kind and position: ``conv1, relu1, pool1, ..., flatten,
fc1, fc2``. Malformed text raises :class:`PatternError` (a ValueError) with the
offending token's position and a caret under it.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Mapping

from cnnjax import layers as L
from cnnjax.models.base import LayerSpec, SequentialModel, layer

__all__ = ["PatternError", "parse_pattern", "pattern_layers", "ConvNet", "from_pattern"]

DEFAULT_CONV_FILTERS = 32
DEFAULT_CONV_SIZE = 3
DEFAULT_FC_UNITS = 128


class PatternError(ValueError):
    """Malformed pattern text; the message points at the offending token."""


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<arrow>->|→)
  | (?P<size>\d+\s*[x×]\s*\d+(?![\w.]))
  | (?P<number>\d+\.\d*(?:[eE][-+]?\d+)?|\d*\.\d+(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<repeat>[*×↕↗])
  | (?P<punct>[\[\]\(\),=?])
    """,
    re.VERBOSE,
)


@dataclasses.dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    pos: int


def _error(text: str, pos: int, message: str) -> PatternError:
    return PatternError(f"pattern: {message} at position {pos}:\n  {text}\n  {' ' * pos}^")


def _tokenize(text: str) -> list[_Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m:
            raise _error(text, pos, f"unexpected character {text[pos]!r}")
        kind = m.lastgroup
        if kind != "ws":
            tokens.append(_Token(kind if kind != "punct" else m.group(), m.group(), pos))
        pos = m.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


# Parsed nodes: ("layer", token, args, kwargs, optional) or ("group", token, items, count, optional)

_KINDS = {
    "CONV": "conv", "RELU": "act", "TANH": "act", "SIGMOID": "act", "SOFTMAX": "act",
    "POOL": "pool", "MAXPOOL": "pool", "MAX_POOL": "pool", "AVGPOOL": "pool",
    "AVG_POOL": "pool", "L2POOL": "pool", "L2_POOL": "pool", "GAP": "gap", "FC": "fc",
    "DENSE": "fc", "DROPOUT": "dropout", "LRN": "lrn",
}


class _Parser:
    def __init__(self, text: str, repeats: Mapping[str, int]):
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0
        self.repeats = {k.upper(): v for k, v in repeats.items()}

    @property
    def tok(self) -> _Token:
        return self.tokens[self.i]

    def fail(self, message: str, tok: _Token | None = None):
        tok = tok or self.tok
        return _error(self.text, tok.pos, message)

    def expect(self, kind: str, what: str) -> _Token:
        if self.tok.kind != kind:
            found = repr(self.tok.text) if self.tok.text else "the end of the text"
            raise self.fail(f"expected {what}, found {found}")
        tok = self.tok
        self.i += 1
        return tok

    def parse(self):
        if self.tok.kind == "end":
            raise self.fail("empty pattern; write e.g. 'INPUT -> FC'")
        if self.tok.kind == "name" and self.tok.text.upper() == "INPUT":
            self.i += 1
            if self.tok.kind == "end":
                raise self.fail("the pattern needs at least one layer after INPUT")
            self.expect("arrow", "'->' after INPUT")
        items = self.sequence()
        if self.tok.kind != "end":
            raise self.fail(f"expected '->' or the end of the pattern, found {self.tok.text!r}")
        return items

    def sequence(self):
        items = [self.item()]
        while self.tok.kind == "arrow":
            self.i += 1
            items.append(self.item())
        return items

    def _optional(self) -> bool:
        if self.tok.kind == "?":
            self.i += 1
            return True
        return False

    def item(self):
        tok = self.tok
        if tok.kind == "[":
            self.i += 1
            inner = self.sequence()
            self.expect("]", "']' to close the group opened at position "
                        f"{tok.pos}, or '->'")
            count = 1
            if self.tok.kind == "repeat":
                self.i += 1
                count = self.count()
            return ("group", tok, inner, count, self._optional())
        if tok.kind != "name":
            found = repr(tok.text) if tok.text else "the end of the text"
            raise self.fail(f"expected a layer (CONV, RELU, POOL, FC, ...) or '[', found {found}")
        upper = tok.text.upper()
        if upper == "INPUT":
            raise self.fail("INPUT may only start the pattern")
        if upper not in _KINDS:
            raise self.fail(
                f"unknown layer {tok.text!r}; known: INPUT, {', '.join(sorted(_KINDS))}")
        self.i += 1
        args, kwargs = [], {}
        if self.tok.kind == "(":
            self.i += 1
            while True:
                arg_tok = self.tok
                value = self.value()
                if self.tok.kind == "=":
                    if arg_tok.kind != "name":
                        raise self.fail("a keyword argument needs a name before '='", arg_tok)
                    self.i += 1
                    kwargs[arg_tok.text.lower()] = (self.value(), arg_tok)
                else:
                    if kwargs:
                        raise self.fail("positional argument after a keyword argument", arg_tok)
                    args.append((value, arg_tok))
                if self.tok.kind == ",":
                    self.i += 1
                    continue
                self.expect(")", "',' or ')'")
                break
        return ("layer", tok, args, kwargs, self._optional())

    def value(self):
        tok = self.tok
        if tok.kind == "number":
            self.i += 1
            return float(tok.text) if any(c in tok.text for c in ".eE") else int(tok.text)
        if tok.kind == "size":
            self.i += 1
            a, b = re.split(r"\s*[x×]\s*", tok.text)
            return (int(a), int(b))
        if tok.kind == "name":
            self.i += 1
            return tok.text.lower()
        found = repr(tok.text) if tok.text else "the end of the text"
        raise self.fail(f"expected a number, a size like 3x3 or a name, found {found}")

    def count(self) -> int:
        tok = self.tok
        if tok.kind == "number" and tok.text.isdigit():
            self.i += 1
            return int(tok.text)
        if tok.kind == "name":
            if tok.text.upper() not in self.repeats:
                raise self.fail(
                    f"loop count {tok.text!r} is not given; pass repeats={{{tok.text!r}: n}}")
            n = self.repeats[tok.text.upper()]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise self.fail(f"loop count {tok.text} = {n!r} must be an integer >= 0")
            self.i += 1
            return n
        found = repr(tok.text) if tok.text else "the end of the text"
        raise self.fail(f"expected a loop count (an integer or a name like N), found {found}")


def parse_pattern(text: str, repeats: Mapping[str, int] | None = None, optional: bool = True):
    """The pattern's layers, loops expanded: a list of ``(kind_name, args, kwargs, token)``."""
    if not isinstance(text, str):
        raise PatternError(f"pattern must be a string, got {type(text).__name__}.")
    parser = _Parser(text, repeats or {})
    tree = parser.parse()
    flat: list = []

    def expand(items):
        for node in items:
            if node[4] and not optional:
                continue
            if node[0] == "group":
                for _ in range(node[3]):
                    expand(node[2])
            else:
                _, tok, args, kwargs, _opt = node
                flat.append((tok.text.upper(), args, kwargs, tok))

    expand(tree)
    return flat, parser


def _pair(value, tok, parser, what):
    if isinstance(value, tuple):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise parser.fail(f"{what} must be a positive integer or a size like 3x3, got {value!r}", tok)


def _int(value, tok, parser, what, minimum=1):
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise parser.fail(f"{what} must be an integer >= {minimum}, got {value!r}", tok)


def _padding(value, tok, parser):
    if value in ("same", "valid"):
        return value.upper()
    if isinstance(value, int) and value >= 0:
        return value
    raise parser.fail(f"padding must be an integer >= 0, same or valid, got {value!r}", tok)


def _check_keys(kwargs, allowed, name, parser):
    for key, (_, tok) in kwargs.items():
        if key not in allowed:
            raise parser.fail(f"{name} has no option {key!r}; use {', '.join(allowed)}", tok)


def pattern_layers(
    text: str,
    num_classes: int = 10,
    *,
    repeats: Mapping[str, int] | None = None,
    optional: bool = True,
) -> tuple[LayerSpec, ...]:
    """The named :class:`LayerSpec` s that ``text`` describes (see the module docstring)."""
    flat, parser = parse_pattern(text, repeats, optional)
    fc_positions = [i for i, (n, *_rest) in enumerate(flat) if _KINDS[n] == "fc"]
    counters: dict[str, int] = {}
    specs: list[LayerSpec] = []
    spatial = True  # whether the current tensor is still a feature map

    def name_for(prefix):
        counters[prefix] = counters.get(prefix, 0) + 1
        return f"{prefix}{counters[prefix]}"

    for index, (upper, args, kwargs, tok) in enumerate(flat):
        kind = _KINDS[upper]
        if kind == "conv":
            if not spatial:
                raise parser.fail("CONV after FC or GAP: the tensor is no longer a feature map",
                                  tok)
            _check_keys(kwargs, ("s", "stride", "p", "padding", "d", "dilation"), "CONV", parser)
            features, size, activation = DEFAULT_CONV_FILTERS, DEFAULT_CONV_SIZE, None
            numbers = [(v, t) for v, t in args if not isinstance(v, str)]
            names = [(v, t) for v, t in args if isinstance(v, str)]
            if len(numbers) > 2:
                raise parser.fail("CONV takes (K, FxF, ...): too many numbers", numbers[2][1])
            if numbers:
                features = _int(numbers[0][0], numbers[0][1], parser, "CONV filters K")
            if len(numbers) > 1:
                size = _pair(numbers[1][0], numbers[1][1], parser, "CONV filter size")
            opts = {"padding": "SAME"}
            for v, t in names:
                if v in ("same", "valid"):
                    opts["padding"] = v.upper()
                elif v in L.ACTIVATIONS:
                    activation = v
                else:
                    raise parser.fail(f"unknown CONV option {v!r}", t)
            for key, (v, t) in kwargs.items():
                if key in ("s", "stride"):
                    opts["stride"] = _pair(v, t, parser, "stride")
                elif key in ("p", "padding"):
                    opts["padding"] = _padding(v, t, parser)
                else:
                    opts["dilation"] = _pair(v, t, parser, "dilation")
            specs.append(layer(name_for("conv"), L.Conv, features=features, kernel_size=size,
                               activation=activation, **opts))
        elif kind == "act":
            if args or kwargs:
                raise parser.fail(f"{upper} takes no arguments", tok)
            specs.append(layer(name_for(upper.lower()), L.Activation, activation=upper.lower()))
        elif kind == "pool":
            if not spatial:
                raise parser.fail(f"{upper} after FC or GAP: nothing spatial left to pool", tok)
            _check_keys(kwargs, ("s", "stride", "p", "padding"), upper, parser)
            if len(args) > 2:
                raise parser.fail(f"{upper} takes (F[, S])", args[2][1])
            window = _pair(args[0][0], args[0][1], parser, "pool window") if args else 2
            stride = _pair(args[1][0], args[1][1], parser, "pool stride") if len(args) > 1 \
                else None
            padding = 0
            for key, (v, t) in kwargs.items():
                if key in ("s", "stride"):
                    stride = _pair(v, t, parser, "pool stride")
                else:
                    padding = _padding(v, t, parser)
            cls = {"A": L.AvgPool, "L": L.L2Pool}.get(upper[0], L.MaxPool)
            specs.append(layer(name_for("pool"), cls, window=window, stride=stride,
                               padding=padding))
        elif kind == "gap":
            if args or kwargs:
                raise parser.fail("GAP takes no arguments", tok)
            specs.append(layer("global_avg_pool", L.GlobalAvgPool))
            spatial = False
        elif kind == "fc":
            _check_keys(kwargs, (), "FC", parser)
            units = num_classes if index == fc_positions[-1] else DEFAULT_FC_UNITS
            activation = None
            for v, t in args:
                if isinstance(v, str):
                    if v not in L.ACTIVATIONS:
                        raise parser.fail(f"unknown FC activation {v!r}", t)
                    activation = v
                else:
                    units = _int(v, t, parser, "FC units")
            if spatial:
                specs.append(layer("flatten", L.Flatten))
                spatial = False
            specs.append(layer(name_for("fc"), L.Dense, features=units, activation=activation))
        elif kind == "dropout":
            _check_keys(kwargs, ("rate",), "DROPOUT", parser)
            values = [*args, *kwargs.values()]
            rate = values[0][0] if values else 0.5
            if isinstance(rate, str) or not 0 <= rate < 1 or len(values) > 1:
                raise parser.fail(f"DROPOUT takes one rate in [0, 1), got {rate!r}",
                                  values[0][1] if values else tok)
            specs.append(layer(name_for("dropout"), L.Dropout, rate=float(rate)))
        else:  # lrn
            _check_keys(kwargs, ("size", "n", "k", "alpha", "beta"), "LRN", parser)
            opts = {"size": 5, "k": 2.0, "alpha": 1e-4, "beta": 0.75}
            for key, (v, _t) in zip(("size", "k", "alpha", "beta"), args, strict=False):
                opts[key] = v
            for key, (v, _t) in kwargs.items():
                opts["size" if key == "n" else key] = v
            if isinstance(opts["size"], bool) or not isinstance(opts["size"], int) \
                    or opts["size"] < 1:
                raise parser.fail(f"LRN size must be a positive integer, got {opts['size']!r}",
                                  tok)
            specs.append(layer(name_for("lrn"), L.LRN, size=opts["size"],
                               k=float(opts["k"]), alpha=float(opts["alpha"]),
                               beta=float(opts["beta"])))
    if not specs:
        raise PatternError(
            f"pattern: {text!r} has no layers after expanding its loops; give a count >= 1 "
            "to at least one group or add a layer such as FC."
        )
    return tuple(specs)


class ConvNet(SequentialModel):
    """A model described by pattern text (see :func:`from_pattern`)."""

    pattern: str = "INPUT -> FC"
    num_classes: int = 10
    repeats: tuple[tuple[str, int], ...] = ()
    optional: bool = True

    def validate(self) -> None:
        try:
            n = operator.index(self.num_classes)
        except TypeError:
            n = 0
        if isinstance(self.num_classes, bool) or n < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}.")
        self.layers()

    def layers(self) -> tuple[LayerSpec, ...]:
        return pattern_layers(self.pattern, self.num_classes, repeats=dict(self.repeats),
                              optional=self.optional)


def from_pattern(
    text: str,
    num_classes: int | None = None,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    *,
    repeats: Mapping[str, int] | None = None,
    optional: bool = True,
    dtype=None,
    name: str | None = None,
) -> ConvNet:
    """Build a model from the lecture's pattern text.

    Example: ``from_pattern("INPUT -> [CONV -> RELU -> POOL]*2 -> FC -> RELU -> FC")``
    or with named loop counts ``from_pattern("INPUT -> [[CONV -> RELU]*N -> POOL?]*M
    -> [FC -> RELU]*K -> FC", repeats={"N": 2, "M": 3, "K": 2})``.

    Args:
      text: the pattern (grammar and defaults in this module's docstring).
      num_classes: units of the last FC when it has no explicit size (default 10).
      input_shape: ``(H, W, C)`` of one example.
      repeats: values of named loop counts (N, M, K, ...).
      optional: whether ``?``-marked items are built.
      dtype: compute dtype (parameters stay float32).

    Raises:
      PatternError: malformed text (a ValueError pointing at the token).
      ShapeError: the layers do not fit ``input_shape``.
    """
    return ConvNet(
        pattern=text,
        num_classes=10 if num_classes is None else num_classes,
        repeats=tuple(sorted((repeats or {}).items())),
        optional=optional,
        input_shape=input_shape,
        dtype=dtype,
        name=name,
    )
