"""Rewrites of a converted ONNX graph that onnxruntime runs faster, each exact.

jax2onnx 0.17 lowers every `lax.scan` to an ONNX `Loop` whose loop-carried state holds the
scan's inputs (`xs`, whole) beside its carry; the body takes element i with a `Gather` and
passes the whole `xs` on to the next iteration through an `Identity`, which onnxruntime runs
as a copy. Every `Dense` becomes an `Einsum` ("abc,cd->abd"), and a fused projection's pieces
are cut apart by a `Split` (a copy). Seven rewrites, applied in this order by `rewrite`
(press_jax/export/onnx_graphs.py calls it on every graph it writes):

1. `hoist_loop_invariants`: a loop-carried value that the body passes through unchanged leaves
   the state; the body reads it from the enclosing scope instead (ONNX subgraphs may).
2. `loops_to_scans`: a `Loop` that runs exactly its trip count (a constant; its condition
   passed through) and uses its iteration number only to `Gather` element i of outer values
   along axis 0 (as long as the trip count where a length is recorded) is an ONNX `Scan` over
   those values: onnxruntime slices a Scan's inputs and writes its outputs in
   place instead of gathering a copy per iteration and concatenating at the end. The Scan's
   outputs are the Loop's, in the same order (final state, then the stacked per-iteration
   values). Loops with a computed condition (the doubling kernel's `while_loop`) stay Loops.
3. `unroll_constant_scans`: a Scan of at most 16 iterations over initializers (the stacked
   encoder blocks' and stages' parameters) is unrolled into the main graph, each iteration's
   parameters sliced to constants (alone no faster; it lets 5 reach the blocks' weights).
4. `einsums_to_matmuls`: an `Einsum` "<x>c,cd-><x>d" (a rank-2 right operand contracted on the
   left operand's last axis) is a `MatMul`.
5. `split_projections`: MatMul(x, W) [+ b] -> Split along the last axis, with constant W, b and
   sizes, is one MatMul (+ Add) per piece with its columns of W (and b).
6. `gelus_in_fused_order`: the tanh GELU ends x * (0.5 * (1 + tanh(u))) as jax writes it;
   onnxruntime's FastGeluFusion matches only (x * 0.5) * (1 + tanh(u)), so it ran the GELU as
   eight full-size operations. The two products are swapped into that order. Halving is exact
   in binary floating point, so both orders round once, to the same value (except where x * 0.5
   is subnormal, |x| < 2^-125); onnxruntime then runs one `FastGelu` kernel (com.microsoft, its
   own optimisation at load time: the file keeps standard ONNX ops). Its kernel rounds
   differently from the eight operations: outputs then move by float32 rounding (4.8e-7 max
   abs on S's exit-1 graph), not bit-identical.
7. `identity_casts_to_identities`: jax2onnx ends every scan body with a `Cast` of each output
   to the type it already has (its "scan_dtype_fix"), so each of the two-pass recurrence's
   chunk sweeps copied its state twice per step (S's exit-2 graph: ~4000 Cast calls per
   call, ~10 % of onnxruntime's node time). A Cast to its input's own element type becomes an
   `Identity`, which onnxruntime aliases instead of copying: bit-identical outputs. They are
   not removed outright: with the body outputs then named by the `Add`/`Mul` that make them,
   onnxruntime 1.32 returned wrong outputs (0.2-0.6 max abs against JAX on the demo's
   perturbed parameters, 2026-12-07), so the names stay and only the copy goes. Measured on
   S's exit-3 graph, 10 s of audio, after 1-6, interleaved (session 24, `/tmp` script):
   3.26 -> 2.94 s (medians of 7 rounds; faster in each of the 7).

Measured on S's exit-1 graph, 4 s of audio, one process, interleaved (2026-12-07, README
"Export"): onnxruntime 1456 ms as converted, 1236 after 1 and 4, 1083 after 1, 2 and 4
(medians of 7); in a later round 1205 as converted, 954 after 1, 2, 4 and 849 after all five.
Outputs bit-identical on that graph (the tests allow float rounding). Rewrite 6, measured the
same way on the graph after 1-5: 852 -> 734 ms (medians of 11; minima 774 -> 699). Each function edits the
`onnx.GraphProto` in place and returns the number of nodes it changed; names are jax2onnx's
(unique within a model), which the renaming relies on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ONNX_REWRITES = ("hoist_loop_invariants", "loops_to_scans", "unroll_constant_scans",
                 "einsums_to_matmuls", "split_projections", "gelus_in_fused_order",
                 "identity_casts_to_identities")


def _subgraphs(node) -> list[Any]:
  import onnx  # noqa: PLC0415 (the optional extra)

  return [attribute.g for attribute in node.attribute
          if attribute.type == onnx.AttributeProto.GRAPH]


def _defines(graph, name: str) -> bool:
  return (any(value.name == name for value in graph.input)
          or any(name in node.output for node in graph.node)
          or any(init.name == name for init in graph.initializer))


def _rename_uses(graph, old: str, new: str) -> None:
  """Every read of `old` in `graph` and its subgraphs (where not shadowed) reads `new`; a graph
  output named `old` is then produced by an Identity of `new`."""
  import onnx  # noqa: PLC0415

  for node in graph.node:
    for index, name in enumerate(node.input):
      if name == old:
        node.input[index] = new
    for body in _subgraphs(node):
      if not _defines(body, old):
        _rename_uses(body, old, new)
  if any(output.name == old for output in graph.output) and not _defines(graph, old):
    graph.node.append(onnx.helper.make_node("Identity", [new], [old]))


def _producers(graph) -> dict[str, Any]:
  return {name: node for node in graph.node for name in node.output}


def _passes_through(producers, output: str, value: str) -> Any:
  """The Identity node making `output` from `value`, True if they are the same name, else None."""
  if output == value:
    return True
  node = producers.get(output)
  if node is not None and node.op_type == "Identity" and node.input[0] == value:
    return node
  return None


def hoist_loop_invariants(graph) -> int:
  """Loop-carried values passed through unchanged leave the Loops' state (module docstring)."""
  count = 0
  for node in graph.node:
    for body in _subgraphs(node):
      count += hoist_loop_invariants(body)
  for node in list(graph.node):
    if node.op_type != "Loop":
      continue
    body = _subgraphs(node)[0]
    producers = _producers(body)
    carried = len(node.input) - 2
    invariant = [j for j in range(carried) if node.input[2 + j]
                 and _passes_through(producers, body.output[1 + j].name, body.input[2 + j].name)]
    for j in reversed(invariant):
      outer, inner, passed = node.input[2 + j], body.input[2 + j].name, body.output[1 + j].name
      final = node.output[j]
      identity = _passes_through(producers, passed, inner)
      del body.output[1 + j]
      del body.input[2 + j]
      if identity is not True:
        body.node.remove(identity)
        _rename_uses(body, passed, outer)
      _rename_uses(body, inner, outer)
      del node.input[2 + j]
      del node.output[j]
      if final:
        _rename_uses(graph, final, outer)
      count += 1
  return count


def _constant(graph_chain, name: str):
  """The value of `name` as a numpy array if an initializer or Constant of these scopes, else
  None."""
  from onnx import numpy_helper  # noqa: PLC0415 (the optional extra)

  for graph in graph_chain:
    for init in graph.initializer:
      if init.name == name:
        return numpy_helper.to_array(init)
    for node in graph.node:
      if node.op_type == "Constant" and name in node.output:
        value = [a for a in node.attribute if a.name == "value"]
        return numpy_helper.to_array(value[0].t) if value else None
  return None


def _leading_dim(graph_chain, name: str) -> int | None:
  """The static size of axis 0 of `name` where a scope records it (initializer or value_info)."""
  for graph in graph_chain:
    for init in graph.initializer:
      if init.name == name:
        return int(init.dims[0]) if init.dims else None
    for value in [*graph.value_info, *graph.input, *graph.output]:
      if value.name == name:
        dims = value.type.tensor_type.shape.dim
        return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None
  return None


def _constant_true(graph_chain, name: str) -> bool:
  """Whether `name` is a boolean initializer or Constant equal to True in the scopes given."""
  value = _constant(graph_chain, name)
  return value is not None and value.dtype == bool and bool(value.all())


def _reads(graph, names: set[str]) -> bool:
  for node in graph.node:
    if names.intersection(node.input):
      return True
    if any(_reads(body, names) for body in _subgraphs(node)):
      return True
  return False


def _value_types(graph) -> dict[str, Any]:
  return {value.name: value.type for value in [*graph.value_info, *graph.output]}


def loops_to_scans(graph, _scopes: tuple = ()) -> int:
  """Loops that are scans over outer values become ONNX Scans (module docstring)."""
  import onnx  # noqa: PLC0415

  scopes = (graph, *_scopes)
  count = 0
  for node in graph.node:
    for body in _subgraphs(node):
      count += loops_to_scans(body, scopes)
  for position, node in enumerate(list(graph.node)):
    if node.op_type != "Loop" or not node.input[0] or not node.input[1]:
      continue
    if not _constant_true(scopes, node.input[1]):
      continue
    body = _subgraphs(node)[0]
    iteration, condition = body.input[0].name, body.input[1].name
    producers = _producers(body)
    passed_condition = _passes_through(producers, body.output[0].name, condition)
    if passed_condition is None:
      continue
    condition_readers = [n for n in body.node if condition in n.input]
    if any(n is not passed_condition for n in condition_readers):
      continue
    gathers = [n for n in body.node if iteration in n.input]
    local = {value.name for value in body.input} | set(producers) | {
        init.name for init in body.initializer}
    if not gathers or not all(
        n.op_type == "Gather" and list(n.input[1:]) == [iteration] and n.input[0] not in local
        and all(onnx.helper.get_attribute_value(a) == 0 for a in n.attribute if a.name == "axis")
        for n in gathers):
      continue
    if any(_reads(sub, {iteration, condition}) for n in body.node for sub in _subgraphs(n)):
      continue
    sequences = list(dict.fromkeys(n.input[0] for n in gathers))
    # A Scan runs as many iterations as its inputs are long, a Loop its trip count. jax2onnx
    # reads the iteration number only to take element i of a scan's xs, whose length jax ties
    # to the scan's; a constant trip count is required, and a recorded static length that
    # differs from it (a loop indexing a longer array) keeps the Loop. Lengths that no
    # value_info records (arrays made inside an enclosing loop's body) are taken as the xs'.
    trip = _constant(scopes, node.input[0])
    if trip is None or trip.size != 1 or any(
        _leading_dim(scopes, name) not in (None, int(trip.reshape(()))) for name in sequences):
      continue
    types = _value_types(body)
    elements = {name: f"{node.name}/scan_input_{k}" for k, name in enumerate(sequences)}
    element_types = {}
    for gather in gathers:
      element_types.setdefault(gather.input[0], types.get(gather.output[0]))
      body.node.remove(gather)
      _rename_uses(body, gather.output[0], elements[gather.input[0]])
    if passed_condition is not True:
      body.node.remove(passed_condition)
    carried_inputs = list(body.input[2:])
    del body.input[:]
    body.input.extend(carried_inputs)
    for name in sequences:
      element = onnx.ValueInfoProto(name=elements[name])
      if element_types[name] is not None:
        element.type.CopyFrom(element_types[name])
      body.input.append(element)
    outputs = list(body.output[1:])
    del body.output[:]
    body.output.extend(outputs)
    scan = onnx.helper.make_node(
        "Scan", list(node.input[2:]) + sequences, list(node.output), name=f"{node.name}_scan",
        body=body, num_scan_inputs=len(sequences))
    graph.node.remove(node)
    graph.node.insert(position, scan)
    count += 1
  return count


def _matmul_equation(equation: str) -> bool:
  """Whether an Einsum equation is "<x>c,cd-><x>d" (distinct letters, no ellipsis)."""
  equation = equation.replace(" ", "")
  if "." in equation or equation.count("->") != 1 or equation.count(",") != 1:
    return False
  operands, result = equation.split("->")
  left, right = operands.split(",")
  return (len(right) == 2 and len(left) >= 2 and left[-1] == right[0]
          and result == left[:-1] + right[1] and len(set(left + right[1])) == len(left) + 1)


def einsums_to_matmuls(graph) -> int:
  """Einsums that are matrix products with a rank-2 right operand become MatMuls."""
  count = 0
  for node in graph.node:
    for body in _subgraphs(node):
      count += einsums_to_matmuls(body)
    if node.op_type != "Einsum" or len(node.input) != 2:
      continue
    equation = [a.s.decode() for a in node.attribute if a.name == "equation"]
    if equation and _matmul_equation(equation[0]):
      node.op_type = "MatMul"
      del node.attribute[:]
      count += 1
  return count


def _all_names(graph, names: set[str]) -> set[str]:
  """Every value name defined in `graph` and its subgraphs (inputs, initializers, outputs of
  nodes)."""
  names.update(value.name for value in graph.input)
  names.update(init.name for init in graph.initializer)
  for node in graph.node:
    names.update(name for name in node.output if name)
    for body in _subgraphs(node):
      _all_names(body, names)
  return names


def _prefix_names(graph, mapping: dict[str, str], prefix: str) -> None:
  """Renames, in place, every value in `mapping` and every node (by `prefix`), recursively."""
  for value in [*graph.input, *graph.output]:
    value.name = mapping.get(value.name, value.name)
  for init in graph.initializer:
    init.name = mapping.get(init.name, init.name)
  del graph.value_info[:]
  for node in graph.node:
    node.input[:] = [mapping.get(name, name) for name in node.input]
    node.output[:] = [mapping.get(name, name) for name in node.output]
    if node.name:
      node.name = prefix + node.name
    for body in _subgraphs(node):
      _prefix_names(body, mapping, prefix)


def unroll_constant_scans(graph, max_iterations: int = 16) -> int:
  """Scans of at most `max_iterations` over initializers of `graph` (the stacked blocks' and
  stages' parameters) unrolled into it: one copy of the body per iteration, its parameters
  sliced to constant initializers, so `split_projections` can cut their weights."""
  import onnx  # noqa: PLC0415 (the optional extra)
  from onnx import numpy_helper  # noqa: PLC0415

  initializers = {init.name: init for init in graph.initializer}
  count = 0
  for position in range(len(graph.node) - 1, -1, -1):
    node = graph.node[position]
    if node.op_type != "Scan":
      continue
    attributes = {a.name: a for a in node.attribute}
    if set(attributes) != {"body", "num_scan_inputs"}:
      continue  # Axes or directions other than the defaults.
    scan_inputs = attributes["num_scan_inputs"].i
    carried = len(node.input) - scan_inputs
    sequences = list(node.input[carried:])
    if not all(name in initializers for name in sequences):
      continue
    arrays = [numpy_helper.to_array(initializers[name]) for name in sequences]
    length = arrays[0].shape[0] if arrays[0].ndim else 0
    if not 1 <= length <= max_iterations or any(a.ndim == 0 or a.shape[0] != length
                                                for a in arrays):
      continue
    body = attributes["body"].g
    stacked_outputs = len(body.output) - carried
    nodes, constants = [], []
    state = list(node.input[:carried])
    stacked = [[] for _ in range(stacked_outputs)]
    for iteration in range(length):
      copy = onnx.GraphProto()
      copy.CopyFrom(body)
      prefix = f"{node.name}/iteration{iteration}/"
      _prefix_names(copy, {name: prefix + name for name in _all_names(copy, set())}, prefix)
      feeds = {copy.input[k].name: state[k] for k in range(carried)}
      for array, value in zip(arrays, copy.input[carried:]):
        constants.append(numpy_helper.from_array(np.ascontiguousarray(array[iteration]),
                                                 value.name))
      constants.extend(copy.initializer)
      for inner in copy.node:
        inner.input[:] = [feeds.get(name, name) for name in inner.input]
        for sub in _subgraphs(inner):
          for old, new in feeds.items():
            if not _defines(sub, old):
              _rename_uses(sub, old, new)
        nodes.append(inner)
      outputs = [feeds.get(value.name, value.name) for value in copy.output]
      state = outputs[:carried]
      for k in range(stacked_outputs):
        stacked[k].append(outputs[carried + k])
    for k in range(carried):
      if node.output[k]:
        nodes.append(onnx.helper.make_node("Identity", [state[k]], [node.output[k]]))
    for k in range(stacked_outputs):
      if not node.output[carried + k]:
        continue
      axes = f"{node.name}/axis0"
      if not any(c.name == axes for c in constants):
        constants.append(numpy_helper.from_array(np.array([0], np.int64), axes))
      pieces = []
      for iteration, name in enumerate(stacked[k]):
        pieces.append(f"{node.name}/stacked{k}/{iteration}")
        nodes.append(onnx.helper.make_node("Unsqueeze", [name, axes], [pieces[-1]]))
      nodes.append(onnx.helper.make_node("Concat", pieces, [node.output[carried + k]], axis=0))
    del graph.node[position]
    for offset, inner in enumerate(nodes):
      graph.node.insert(position + offset, inner)
    graph.initializer.extend(constants)
    initializers.update((c.name, c) for c in constants)
    count += 1
  return count


def _rank(types, name: str) -> int | None:
  value = types.get(name)
  if value is None or not value.tensor_type.HasField("shape"):
    return None
  return len(value.tensor_type.shape.dim)


def split_projections(graph, ranks: dict[str, int | None] | None = None) -> int:
  """MatMul(x, W) [+ b] -> Split along the last axis, with W, b and the sizes constants of
  `graph` and nothing else reading the product: one MatMul (+ Add) per piece with the columns
  of W (and b) it needs, writing each piece directly (no product to copy apart; the fused
  projections of the mixers and gated feed-forwards)."""
  import onnx  # noqa: PLC0415 (the optional extra)
  from onnx import numpy_helper  # noqa: PLC0415

  initializers = {init.name: init for init in graph.initializer}
  producers = _producers(graph)
  readers: dict[str, int] = {}
  for node in graph.node:
    for name in node.input:
      readers[name] = readers.get(name, 0) + 1
  outputs = {value.name for value in graph.output}

  def constant(name):
    if name in initializers:
      return numpy_helper.to_array(initializers[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Reshape" and all(
        x in initializers for x in node.input):
      shape = numpy_helper.to_array(initializers[node.input[1]])
      if shape.ndim == 1 and (shape > 0).all():
        return numpy_helper.to_array(initializers[node.input[0]]).reshape(shape)
    return None

  def single_reader(name):
    return readers.get(name, 0) == 1 and name not in outputs

  count = 0
  for split in list(graph.node):
    if split.op_type != "Split" or len(split.input) != 2:
      continue
    sizes = constant(split.input[1])
    axis = [a.i for a in split.attribute if a.name == "axis"]
    axis = axis[0] if axis else 0
    product, add, bias = split.input[0], None, None
    node = producers.get(product)
    if sizes is None or node is None or not single_reader(product):
      continue
    if node.op_type == "Add":
      values = [constant(x) for x in node.input]
      if sum(v is not None for v in values) != 1:
        continue
      add, bias = node, next(v for v in values if v is not None)
      product = next(x for x, v in zip(node.input, values) if v is None)
      node = producers.get(product)
      if node is None or not single_reader(product):
        continue
    if node.op_type != "MatMul":
      continue
    weight = constant(node.input[1])
    if weight is None or weight.ndim != 2 or int(sizes.sum()) != weight.shape[1]:
      continue
    rank = (ranks or {}).get(split.input[0]) or (bias.ndim if bias is not None
                                                 and bias.ndim > 1 else None)
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
      continue
    if bias is not None and (bias.shape[-1] != weight.shape[1]
                             or any(d != 1 for d in bias.shape[:-1])):
      continue
    position = min(list(graph.node).index(n) for n in (node, add, split) if n is not None)
    replacement, start = [], 0
    for k, (size, output) in enumerate(zip(sizes.tolist(), split.output)):
      columns = slice(start, start + size)
      start += size
      name = f"{node.name}/columns{k}"
      graph.initializer.append(numpy_helper.from_array(
          np.ascontiguousarray(weight[:, columns]), f"{name}/weight"))
      if bias is None:
        replacement.append(onnx.helper.make_node("MatMul", [node.input[0], f"{name}/weight"],
                                                 [output], name=name))
        continue
      graph.initializer.append(numpy_helper.from_array(
          np.ascontiguousarray(bias[..., columns]), f"{name}/bias"))
      replacement += [
          onnx.helper.make_node("MatMul", [node.input[0], f"{name}/weight"],
                                [f"{name}/product"], name=name),
          onnx.helper.make_node("Add", [f"{name}/product", f"{name}/bias"], [output],
                                name=f"{name}/add")]
    for old in (split, add, node):
      if old is not None:
        graph.node.remove(old)
    for offset, new in enumerate(replacement):
      graph.node.insert(position + offset, new)
    count += 1
  return count


def _is_scalar_constant(graph_chain, name: str, value: float) -> bool:
  constant = _constant(graph_chain, name)
  return constant is not None and constant.size == 1 and float(constant.reshape(())) == value


def gelus_in_fused_order(graph, _scopes: tuple = ()) -> int:
  """Tanh -> Add(1) -> Mul(0.5) -> Mul(x), each product read once: the last two become
  Mul(x, 0.5) and Mul(1 + tanh, x * 0.5), the order onnxruntime's FastGeluFusion matches
  (module docstring, rewrite 6). In subgraphs too."""
  chain = (graph, *_scopes)
  count = 0
  for node in graph.node:
    for body in _subgraphs(node):
      count += gelus_in_fused_order(body, chain)
  readers: dict[str, list[Any]] = {}
  for node in graph.node:
    for name in node.input:
      readers.setdefault(name, []).append(node)
  outputs = {value.name for value in graph.output}

  def single_reader(name, op_type):
    nodes = readers.get(name, [])
    if name in outputs or len(nodes) != 1 or nodes[0].op_type != op_type:
      return None
    return nodes[0]

  def other_input(node, name):
    inputs = list(node.input)
    if len(inputs) != 2 or inputs.count(name) != 1:
      return None
    return inputs[1 - inputs.index(name)]

  position = {name: index for index, node in enumerate(graph.node) for name in node.output}
  for tanh in [node for node in graph.node if node.op_type == "Tanh"]:
    plus_one = single_reader(tanh.output[0], "Add")
    if plus_one is None or not _is_scalar_constant(
        chain, other_input(plus_one, tanh.output[0]) or "", 1.0):
      continue
    halve = single_reader(plus_one.output[0], "Mul")
    half = halve is not None and other_input(halve, plus_one.output[0])
    if not half or not _is_scalar_constant(chain, half, 0.5):
      continue
    times_x = single_reader(halve.output[0], "Mul")
    x = times_x is not None and other_input(times_x, halve.output[0])
    if not x or x == half or position.get(x, -1) > position[halve.output[0]]:
      continue  # (x must exist where x * 0.5 is computed now.)
    del halve.input[:]
    halve.input.extend([x, half])
    del times_x.input[:]
    times_x.input.extend([plus_one.output[0], halve.output[0]])
    count += 1
  return count


def _element_types(proto) -> dict[str, int]:
  """{value name: ONNX element type} over the graph and every subgraph, from onnx's shape
  inference (on a copy); names are unique within a jax2onnx model."""
  from onnx import shape_inference  # noqa: PLC0415 (the optional extra)

  types: dict[str, int] = {}

  def collect(graph):
    for value in [*graph.input, *graph.output, *graph.value_info]:
      if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
        types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
      types[init.name] = init.data_type
    for node in graph.node:
      for body in _subgraphs(node):
        collect(body)

  collect(shape_inference.infer_shapes(proto).graph)
  return types


def identity_casts_to_identities(graph, types: dict[str, int]) -> int:
  """Casts to the element type their input already has become Identities (module docstring);
  `types` as `_element_types` gives them. Casts whose input type is unknown stay."""
  import onnx  # noqa: PLC0415

  count = 0
  for node in graph.node:
    for body in _subgraphs(node):
      count += identity_casts_to_identities(body, types)
    if node.op_type != "Cast":
      continue
    target = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
    if types.get(node.input[0]) == target:
      node.op_type = "Identity"
      del node.attribute[:]
      count += 1
  return count


def _drop_unused_initializers(graph) -> int:
  used: set[str] = set()

  def collect(g):
    for node in g.node:
      used.update(node.input)
      for body in _subgraphs(node):
        collect(body)
    used.update(value.name for value in g.output)

  collect(graph)
  unused = [init for init in graph.initializer if init.name not in used]
  for init in unused:
    graph.initializer.remove(init)
  return len(unused)


def _value_ranks(proto) -> dict[str, int | None]:
  """{value name: rank} of the top-level graph's values, from onnx's shape inference (on a
  copy)."""
  from onnx import shape_inference  # noqa: PLC0415 (the optional extra)

  graph = shape_inference.infer_shapes(proto).graph
  return {value.name: _rank({value.name: value.type}, value.name)
          for value in [*graph.value_info, *graph.output]}


def rewrite(proto) -> dict[str, int]:
  """All the rewrites on a ModelProto, in place; {rewrite name: nodes changed}."""
  graph = proto.graph
  counts = {"hoist_loop_invariants": hoist_loop_invariants(graph),
            "loops_to_scans": loops_to_scans(graph),
            "unroll_constant_scans": unroll_constant_scans(graph),
            "einsums_to_matmuls": einsums_to_matmuls(graph)}
  counts["split_projections"] = split_projections(graph, _value_ranks(proto))
  counts["gelus_in_fused_order"] = gelus_in_fused_order(graph)
  counts["identity_casts_to_identities"] = identity_casts_to_identities(
      graph, _element_types(proto))
  _drop_unused_initializers(graph)
  return counts
