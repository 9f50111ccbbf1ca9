"""Interconnect traffic of a compiled program: the bytes its collectives move into each chip.

Read from the optimized HLO text (`compiled.as_text()`): every collective of every computation the
entry reaches (fusions, calls, async wrappers, a conditional's costliest branch, while bodies and
conditions times their trips, nested loops multiplied), each counted once (an async `-start` /
`-done` pair at its start). A while's trip count is the compiler's (`known_trip_count` in its
backend_config: XLA:CPU and XLA:GPU write it; libtpu does not) or read from the loop itself: a
counter with a constant start and step, and a condition comparing it with a constant (a scan, a
fori_loop). A condition that also depends on data (a decode loop that ends when every row has
stopped) is counted at its counter's bound, every iteration run, as the dry run counts decode
steps; that bound must be one of the trip counts the program declares for its while_loops
(`Program.while_trips`). A loop whose count is none of these is an error naming it, never a guess.
"""

import dataclasses
import math
import re

# Bytes one chip receives from the others per collective over a group of n chips, from the bytes
# of its operands (what the chip itself contributes) and of its result, with the
# bandwidth-optimal (ring) algorithms; a chip sends as much as it receives. The one place these
# rules are written. (The result of an async -start is a tuple also holding its operands; only
# all-reduce reads it, whose -start has its result's shape.)
TRAFFIC = {
    # The other n - 1 shards: (n - 1) / n of the gathered output.
    "all-gather": lambda operand, result, n: operand * (n - 1),
    # The other n - 1 chips' partial sums of its 1 / n: (n - 1) / n of its input.
    "reduce-scatter": lambda operand, result, n: operand * (n - 1) / n,
    # A reduce-scatter of its input, then an all-gather of the result: 2 (n - 1) / n of its
    # input when (as usual) the result has its input's type; libtpu may reduce float32 into a
    # bfloat16 result.
    "all-reduce": lambda operand, result, n: (operand + result) * (n - 1) / n,
    # It keeps 1 / n of its input and receives as much from each other chip: (n - 1) / n.
    "all-to-all": lambda operand, result, n: operand * (n - 1) / n,
    # One whole operand from its source.
    "collective-permute": lambda operand, result, n: operand,
    # The root's whole operand.
    "collective-broadcast": lambda operand, result, n: operand,
}
# Collectives with no rule above: a program holding one is an error, not a zero.
UNCOUNTED = ("ragged-all-to-all", "send", "recv")


def seconds(bytes_per_chip: float, interconnect_bandwidth: float) -> float:
  """Seconds to move `bytes_per_chip` into a chip over links of `interconnect_bandwidth` bytes/s
  (both directions together, as published): half of it, as a chip receives in one direction
  while it sends as much in the other. Bandwidth-bound: no latency, every link busy."""
  return bytes_per_chip / (interconnect_bandwidth / 2)


@dataclasses.dataclass(frozen=True)
class Traffic:
  """What a program's collectives move into one chip in one run, and how many run, by kind."""

  bytes: dict
  ops: dict

  @property
  def total_bytes(self) -> float:
    return sum(self.bytes.values())


def traffic(hlo_text: str, while_trips: tuple[int, ...] = ()) -> Traffic:
  """The collective traffic of one run of an optimized HLO module (module docstring).

  while_trips: the trip counts the program's while_loops declare; a loop whose condition depends
  on data is counted at its counter's bound, which must be one of them.
  """
  module = _parse(hlo_text)
  return _Counter(module, tuple(while_trips)).computation(module.entry)


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25, "s1": 0.125, "u1": 0.125,
                "token": 0}


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape, e.g. `bf16[8,128]{1,0}` or a tuple `(s32[], f32[4,2])`."""
  total = 0.0
  for dtype, dims in re.findall(r"([a-z][a-z0-9]*)\[([^\]]*)\]", shape):
    if dtype in _DTYPE_BYTES:
      size = _DTYPE_BYTES[dtype]
    elif dtype.startswith(("f8", "f6", "f4")):
      size = int(dtype[1]) / 8
    else:
      raise ValueError(f"HLO shape {shape!r}: no byte size for element type {dtype!r}")
    total += size * math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d)
  return total


def group_size(attributes: str, devices: int) -> int:
  """Chips in each replica group of a collective (the largest group), from its attributes:
  `replica_groups={{0,1},{2,3}}`, iota `[2,4]<=[8]`, mesh axes `mesh['x'=2,'y'=4] {'y'}`, or
  none / `{}` (one group of all `devices`)."""
  found = re.search(r"replica_groups=", attributes)
  if not found:
    return devices
  text = attributes[found.end():]
  explicit = re.match(r"\{((?:\{[\d,\s]*\},?\s*)*)\}", text)
  if explicit:
    groups = re.findall(r"\{([\d,\s]*)\}", explicit.group(1))
    return max((len(re.findall(r"\d+", g)) for g in groups), default=devices)
  iota = re.match(r"\[([\d,]+)\]<=", text)
  if iota:
    return int(iota.group(1).split(",")[-1])
  mesh = re.match(r"mesh\[([^\]]*)\][^{]*\{([^}]*)\}", text)
  if mesh:
    sizes = {name: int(size) for name, size in re.findall(r"'([^']*)'=(\d+)", mesh.group(1))}
    axes = re.findall(r"'([^']*)'(?::\((\d+)\)(\d+))?", mesh.group(2))
    if all(name in sizes for name, _, _ in axes):
      return math.prod(int(sub) if sub else sizes[name] for name, _, sub in axes)
  raise ValueError(f"replica_groups of an unknown form: {text[:120]!r}")


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list
  literal: str  # The text between the parentheses: operands, or a constant's value.
  attributes: str

  def attribute(self, key: str) -> str | None:
    found = re.search(rf"\b{key}=%?([\w.\-]+)", self.attributes)
    return found.group(1) if found else None

  def computations(self, key: str) -> list[str]:
    """Computations named by a `key={%a, %b}` attribute."""
    found = re.search(rf"\b{key}=\{{([^}}]*)\}}", self.attributes)
    return re.findall(r"%?([\w.\-]+)", found.group(1)) if found else []

  def describe(self) -> str:
    op_name = re.search(r'op_name="([^"]*)"', self.attributes)
    return f"%{self.name}" + (f" ({op_name.group(1)})" if op_name else "")


@dataclasses.dataclass
class _Computation:
  name: str
  instructions: dict
  root: str | None = None


@dataclasses.dataclass
class _Module:
  computations: dict
  entry: str
  devices: int


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at `start`."""
  depth = 0
  for index in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[index], 0)
    if depth == 0:
      return index
  raise ValueError(f"HLO text: unbalanced parentheses in {text[:200]!r}")


def _parse_instruction(line: str) -> tuple[bool, _Instruction]:
  head = re.match(r"\s*(ROOT )?%?([\w.\-]+) = ", line)
  if not head:
    raise ValueError(f"HLO text: cannot read the instruction {line[:200]!r}")
  rest = line[head.end():]
  shape_end = _closing(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")
  shape, rest = rest[:shape_end], rest[shape_end:].lstrip()
  opcode = re.match(r"[\w\-]+", rest).group(0)
  close = _closing(rest, len(opcode))
  literal = rest[len(opcode) + 1:close]
  return bool(head.group(1)), _Instruction(
      name=head.group(2), shape=shape, opcode=opcode,
      operands=re.findall(r"%([\w.\-]+)", literal), literal=literal,
      attributes=rest[close + 1:])


def _lines(text: str):
  """The text's lines, an instruction that runs on over several (a kernel's metadata) joined
  into one: until its braces and parentheses outside string literals close."""
  pending = ""
  for line in text.splitlines():
    pending = f"{pending}\n{line}" if pending else line
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', "", pending)
    if (not re.match(r"\s+(ROOT )?%?[\w.\-]+ = ", pending)
        or (bare.count("{") == bare.count("}") and bare.count("(") == bare.count(")"))):
      yield pending
      pending = ""
  if pending:
    raise ValueError(f"HLO text: an instruction never closes: {pending[:200]!r}")


def _parse(text: str) -> _Module:
  computations, entry, current = {}, None, None
  for line in _lines(text):
    header = re.match(r"(ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
    if current is None and header:
      current = _Computation(header.group(2), {})
      computations[current.name] = current
      entry = current.name if header.group(1) else entry
    elif current is not None and re.fullmatch(r'\}(, execution_thread="\w+")?', line.strip()):
      current = None
    elif current is not None and line.strip():
      is_root, instruction = _parse_instruction(line)
      current.instructions[instruction.name] = instruction
      if is_root:
        current.root = instruction.name
  if entry is None:
    raise ValueError("HLO text without an ENTRY computation")
  partitions = re.search(r"\bnum_partitions=(\d+)", text)
  replicas = re.search(r"\breplica_count=(\d+)", text)
  devices = (int(partitions.group(1)) if partitions else 1) * (
      int(replicas.group(1)) if replicas else 1)
  return _Module(computations, entry, devices)


_LOOP = "the loop's tuple"  # The value of a while condition's or body's parameter.


def _value(module: _Module, computation: _Computation, name: str, parameter):
  """What a scalar instruction computes, as far as a trip count needs it: an int; a loop counter
  ("counter", tuple index, offset); ("compare", direction, a, b); ("and", a, b); None when
  unknown. parameter(k): the value of the computation's parameter k."""
  instruction = computation.instructions[name]
  op = instruction.opcode
  operand = lambda k: _value(module, computation, instruction.operands[k], parameter)
  if op == "constant":
    literal = instruction.literal.strip()
    return int(literal) if re.fullmatch(r"-?\d+", literal) else None
  if op == "parameter":
    return parameter(int(instruction.literal))
  if op in ("copy", "bitcast", "convert", "reshape") and len(instruction.operands) == 1:
    return operand(0)
  if op == "get-tuple-element":
    index = int(instruction.attribute("index"))
    source = computation.instructions[instruction.operands[0]]
    if source.opcode == "tuple":
      return _value(module, computation, source.operands[index], parameter)
    return ("counter", index, 0) if operand(0) is _LOOP else None
  if op in ("fusion", "call"):
    callee = module.computations[instruction.attribute("calls" if op == "fusion" else "to_apply")]
    return _value(module, callee, callee.root, lambda k: operand(k))
  if op in ("add", "subtract"):
    a, b = operand(0), operand(1)
    sign = 1 if op == "add" else -1
    if isinstance(a, int) and isinstance(b, int):
      return a + sign * b
    if isinstance(a, tuple) and a[0] == "counter" and isinstance(b, int):
      return ("counter", a[1], a[2] + sign * b)
    if op == "add" and isinstance(b, tuple) and b[0] == "counter" and isinstance(a, int):
      return ("counter", b[1], b[2] + a)
    return None
  if op == "compare":
    return ("compare", instruction.attribute("direction"), operand(0), operand(1))
  if op == "and":
    return ("and", operand(0), operand(1))
  return None


def _conjuncts(value) -> list:
  if isinstance(value, tuple) and value[0] == "and":
    return _conjuncts(value[1]) + _conjuncts(value[2])
  return [value]


_FLIPPED = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "NE": "NE", "EQ": "EQ"}


def _trips(start: int, step: int, direction: str, limit: int) -> int | None:
  """Iterations of `for (i = start; i <direction> limit; i += step)`, None if unbounded."""
  if direction in ("LT", "LE") and step > 0:
    return max(0, -(-(limit + (direction == "LE") - start) // step))
  if direction in ("GT", "GE") and step < 0:
    return max(0, -(-(start - limit + (direction == "GE")) // -step))
  if direction == "NE" and step and (limit - start) % step == 0 and (limit - start) // step >= 0:
    return (limit - start) // step
  return None


class _Counter:
  """Walks a module from its entry, multiplying by loop trips (memoized per computation)."""

  def __init__(self, module: _Module, while_trips: tuple[int, ...]):
    self.module, self.while_trips, self.done = module, while_trips, {}

  def computation(self, name: str) -> Traffic:
    if name not in self.done:
      computation = self.module.computations[name]
      total = Traffic({kind: 0.0 for kind in TRAFFIC}, {kind: 0 for kind in TRAFFIC})
      for instruction in computation.instructions.values():
        for part, times in self._parts(computation, instruction):
          for kind in TRAFFIC:
            total.bytes[kind] += times * part.bytes[kind]
            total.ops[kind] += times * part.ops[kind]
      self.done[name] = total
    return self.done[name]

  def _parts(self, computation: _Computation, instruction: _Instruction):
    """(traffic, times) of what one instruction runs."""
    op = instruction.opcode
    kind = op.removesuffix("-start")
    if kind in TRAFFIC:
      operands = sum(shape_bytes(computation.instructions[name].shape)
                     for name in instruction.operands)
      moved = TRAFFIC[kind](operands, shape_bytes(instruction.shape),
                            group_size(instruction.attributes, self.module.devices))
      yield Traffic({**dict.fromkeys(TRAFFIC, 0.0), kind: moved},
                    {**dict.fromkeys(TRAFFIC, 0), kind: 1}), 1
    elif kind in UNCOUNTED:
      raise ValueError(f"{instruction.describe()}: no traffic rule for {op} "
                       "(prerl_jax/aot/collectives.py TRAFFIC)")
    elif op == "while":
      trips = self._trip_count(computation, instruction)
      yield self.computation(instruction.attribute("body")), trips
      yield self.computation(instruction.attribute("condition")), trips + 1
    elif op == "conditional":
      branches = (instruction.computations("branch_computations")
                  or [instruction.attribute("true_computation"),
                      instruction.attribute("false_computation")])
      yield max((self.computation(b) for b in branches), key=lambda t: t.total_bytes), 1
    elif op in ("fusion", "async-start"):
      yield self.computation(instruction.attribute("calls")), 1
    elif op == "call":
      yield self.computation(instruction.attribute("to_apply")), 1
    elif op == "custom-call":
      for callee in instruction.computations("called_computations"):
        yield self.computation(callee), 1

  def _trip_count(self, computation: _Computation, loop: _Instruction) -> int:
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attributes)
    if known:
      return int(known.group(1))
    computations = self.module.computations
    condition = computations[loop.attribute("condition")]
    body = computations[loop.attribute("body")]
    in_loop = lambda k: _LOOP
    body_root = body.instructions[body.root]

    def element(index: int):
      """(start, step) of the loop tuple's element `index`; None where not constant."""
      init = computation.instructions[loop.operands[0]]
      while init.opcode == "copy":
        init = computation.instructions[init.operands[0]]
      if init.opcode != "tuple" or body_root.opcode != "tuple":
        return None
      start = _value(self.module, computation, init.operands[index], lambda k: None)
      after = _value(self.module, body, body_root.operands[index], in_loop)
      if not isinstance(start, int) or not (isinstance(after, tuple) and after[0] == "counter"
                                            and after[1] == index):
        return None
      return start, after[2]

    bounds = []
    terms = _conjuncts(_value(self.module, condition, condition.root, in_loop))
    for term in terms:
      if not (isinstance(term, tuple) and term[0] == "compare"):
        continue
      _, direction, a, b = term
      if not (isinstance(a, tuple) and a[0] == "counter"):
        a, b, direction = b, a, _FLIPPED.get(direction)
      if not (isinstance(a, tuple) and a[0] == "counter"):
        continue
      if isinstance(b, tuple) and b[0] == "counter" and b[2] == 0:
        limit = element(b[1])  # A loop-invariant bound carried in the tuple.
        b = limit[0] if limit and limit[1] == 0 else None
      counter = element(a[1])
      if counter and isinstance(b, int):
        trips = _trips(counter[0], counter[1], direction, b - a[2])
        if trips is not None:
          bounds.append(trips)
    where = f"while {loop.describe()} in %{computation.name}"
    if not bounds:
      raise ValueError(f"{where}: its trip count is unknown (no known_trip_count, and its "
                       f"condition %{condition.name} compares no counter of constant start and "
                       "step with a constant)")
    if len(bounds) == len(terms):
      return min(bounds)
    if min(bounds) not in self.while_trips:
      raise ValueError(
          f"{where}: its condition depends on data, and its counter's bound of {min(bounds)} "
          f"trips is not among the program's declared while_loop trips {self.while_trips}")
    return min(bounds)
