"""press_jax.export.onnx_rewrites: each rewrite keeps a graph's outputs (onnxruntime before and
after, against a numpy loop) and changes the nodes it says.

The graphs are built by hand in the form jax2onnx 0.17 gives a `lax.scan` (a Loop whose state
carries the scanned arrays whole, gathered by iteration number and passed on by Identity), plus
a real jax2onnx conversion of a scan, so a converter that changed that form would show here.
The model's graphs are checked against JAX in tests/test_export_onnx.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from press_jax.export import onnx_graphs
from press_jax.export import onnx_rewrites

pytestmark = pytest.mark.skipif(onnx_graphs.missing_extra() is not None,
                                reason=str(onnx_graphs.missing_extra()))

STEPS, ROWS = 5, 3


def _helpers():
  import onnx  # noqa: PLC0415 (the optional extra)
  from onnx import TensorProto, helper  # noqa: PLC0415

  return onnx, TensorProto, helper


def _value(name, shape=None):
  _, tensor, helper = _helpers()
  return helper.make_tensor_value_info(name, tensor.FLOAT, shape)


def _scan_loop_body(prefix: str, extra_nodes=(), condition_out=None):
  """The body of h_i = a_i * h_{i-1} + b_i, scan output h_i, in jax2onnx's Loop form."""
  onnx, tensor, helper = _helpers()
  nodes = [
      helper.make_node("Gather", [f"{prefix}a_all", f"{prefix}i"], [f"{prefix}a_i"], axis=0),
      helper.make_node("Gather", [f"{prefix}b_all", f"{prefix}i"], [f"{prefix}b_i"], axis=0),
      helper.make_node("Mul", [f"{prefix}a_i", f"{prefix}h"], [f"{prefix}ah"]),
      helper.make_node("Add", [f"{prefix}ah", f"{prefix}b_i"], [f"{prefix}h_next"]),
      helper.make_node("Identity", [f"{prefix}h_next"], [f"{prefix}h_seq"]),
      helper.make_node("Identity", [f"{prefix}a_all"], [f"{prefix}a_all_out"]),
      helper.make_node("Identity", [f"{prefix}b_all"], [f"{prefix}b_all_out"]),
      *extra_nodes]
  if condition_out is None:
    nodes.append(helper.make_node("Identity", [f"{prefix}cond"], [f"{prefix}cond_out"]))
  inputs = [helper.make_tensor_value_info(f"{prefix}i", tensor.INT64, []),
            helper.make_tensor_value_info(f"{prefix}cond", tensor.BOOL, []),
            _value(f"{prefix}h", [ROWS]), _value(f"{prefix}a_all", [STEPS, ROWS]),
            _value(f"{prefix}b_all", [STEPS, ROWS])]
  outputs = [helper.make_tensor_value_info(condition_out or f"{prefix}cond_out", tensor.BOOL, []),
             _value(f"{prefix}h_next", [ROWS]), _value(f"{prefix}a_all_out", [STEPS, ROWS]),
             _value(f"{prefix}b_all_out", [STEPS, ROWS]), _value(f"{prefix}h_seq", [ROWS])]
  del onnx
  return helper.make_graph(nodes, f"{prefix}body", inputs, outputs)


def _scan_model(extra_nodes=(), condition_out=None, consume_passed=False, trip=STEPS):
  """(a, b) (STEPS, ROWS) -> final h, every h (trip, ROWS) [, a passed through the Loop]."""
  onnx, tensor, helper = _helpers()
  body = _scan_loop_body("", extra_nodes, condition_out)
  loop = helper.make_node("Loop", ["trip", "true", "h0", "a", "b"],
                          ["h_final", "a_final", "b_final", "h_all"], body=body)
  nodes = [loop]
  outputs = [_value("h_final", [ROWS]), _value("h_all", [STEPS, ROWS])]
  if consume_passed:  # A Loop output that passes its input through, read downstream.
    nodes.append(helper.make_node("Neg", ["a_final"], ["minus_a"]))
    outputs += [_value("minus_a", [STEPS, ROWS]), _value("b_final", [STEPS, ROWS])]
  graph = helper.make_graph(
      nodes, "scan", [_value("a", [STEPS, ROWS]), _value("b", [STEPS, ROWS])], outputs,
      initializer=[helper.make_tensor("trip", tensor.INT64, [], [trip]),
                   helper.make_tensor("true", tensor.BOOL, [], [True]),
                   helper.make_tensor("h0", tensor.FLOAT, [ROWS], [0.5] * ROWS)])
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, **feeds):
  import onnxruntime  # noqa: PLC0415

  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                         providers=["CPUExecutionProvider"])
  return session.run(None, feeds)


def _numpy_scan(a, b, h=0.5):
  states = []
  h = np.full(a.shape[1:], h, np.float32)
  for a_i, b_i in zip(a, b):
    h = a_i * h + b_i
    states.append(h)
  return h, np.stack(states)


def _inputs():
  rng = np.random.default_rng(0)
  return (rng.uniform(0.2, 1.0, (STEPS, ROWS)).astype(np.float32),
          rng.normal(size=(STEPS, ROWS)).astype(np.float32))


def _op_types(graph) -> list[str]:
  return sorted(node.op_type for node in graph.node)


def test_scan_loop_becomes_scan_with_the_same_outputs():
  onnx, _, _ = _helpers()
  a, b = _inputs()
  model = _scan_model(consume_passed=True)
  before = _run(model, a=a, b=b)
  counts = onnx_rewrites.rewrite(model)
  onnx.checker.check_model(model, full_check=True)
  after = _run(model, a=a, b=b)
  assert counts == {"hoist_loop_invariants": 2, "loops_to_scans": 1, "unroll_constant_scans": 0,
                    "einsums_to_matmuls": 0, "split_projections": 0,
                    "gelus_in_fused_order": 0, "identity_casts_to_identities": 0}
  assert _op_types(model.graph) == ["Identity", "Neg", "Scan"]  # Identity: b_final = b.
  (scan,) = [n for n in model.graph.node if n.op_type == "Scan"]
  body = scan.attribute[0].g
  assert "Gather" not in _op_types(body) and len(body.input) == 3  # h, a_i, b_i.
  final, states = _numpy_scan(a, b)
  for got in (before, after):
    np.testing.assert_allclose(got[0], final, rtol=1e-6)
    np.testing.assert_allclose(got[1], states, rtol=1e-6)
    np.testing.assert_array_equal(got[2], -a)
    np.testing.assert_array_equal(got[3], b)


def test_loop_with_a_computed_condition_stays_a_loop():
  onnx, tensor, helper = _helpers()
  del onnx
  a, b = _inputs()
  # Stops when the state's first entry exceeds 1e9 (never here): a while loop, not a scan.
  limit = helper.make_node("Constant", [], ["limit"],
                           value=helper.make_tensor("limit", tensor.FLOAT, [], [1e9]))
  first = helper.make_node("ReduceMax", ["h_next"], ["largest"], keepdims=0)
  keep_going = helper.make_node("Less", ["largest", "limit"], ["cond_out"])
  model = _scan_model(extra_nodes=(limit, first, keep_going), condition_out="cond_out")
  before = _run(model, a=a, b=b)
  counts = onnx_rewrites.rewrite(model)
  assert counts["loops_to_scans"] == 0 and counts["hoist_loop_invariants"] == 2
  assert _op_types(model.graph) == ["Loop"]
  for got, want in zip(_run(model, a=a, b=b), before):
    np.testing.assert_array_equal(got, want)


def test_loop_that_reads_its_iteration_number_stays_a_loop():
  _, tensor, helper = _helpers()
  a, b = _inputs()
  # The iteration number also feeds arithmetic: h_i = a_i h + b_i + i.
  model = _scan_model()
  body = model.graph.node[0].attribute[0].g
  body.node.insert(0, helper.make_node("Cast", ["i"], ["i_float"], to=tensor.FLOAT))
  position, add = [(k, n) for k, n in enumerate(body.node) if n.op_type == "Add"][0]
  add.output[0] = "h_partial"
  body.node.insert(position + 1, helper.make_node("Add", ["h_partial", "i_float"], ["h_next"]))
  counts = onnx_rewrites.rewrite(model)
  assert counts["loops_to_scans"] == 0
  got = _run(model, a=a, b=b)
  h, states = np.full(ROWS, 0.5, np.float32), []
  for i in range(STEPS):
    h = a[i] * h + b[i] + i
    states.append(h)
  np.testing.assert_allclose(got[0], h, rtol=1e-6)
  np.testing.assert_allclose(got[1], np.stack(states), rtol=1e-6)


def test_loop_over_part_of_a_longer_array_stays_a_loop():
  a, b = _inputs()
  model = _scan_model(trip=STEPS - 2)  # Gathers rows 0..2 of the (5, 3) inputs.
  counts = onnx_rewrites.rewrite(model)
  assert counts["loops_to_scans"] == 0 and _op_types(model.graph) == ["Loop"]
  final, states = _numpy_scan(a[:STEPS - 2], b[:STEPS - 2])
  got = _run(model, a=a, b=b)
  np.testing.assert_allclose(got[0], final, rtol=1e-6)
  np.testing.assert_allclose(got[1], states, rtol=1e-6)


@pytest.mark.parametrize("equation, matmul", [
    ("abc,cd->abd", True), ("ab,bc->ac", True), ("abcd,de->abce", True),
    ("abc,dc->abd", False), ("abc,cd->adb", False), ("...c,cd->...d", False),
    ("zab,zcad->zbcd", False), ("abc,bd->acd", False), ("abc,cb->ab", False)])
def test_einsum_matmul_equations(equation, matmul):
  onnx, tensor, helper = _helpers()
  del onnx
  assert onnx_rewrites._matmul_equation(equation) is matmul  # pylint: disable=protected-access
  operands, _ = equation.replace("...", "x").split("->")
  left, right = operands.split(",")
  sizes = dict(zip("abcdexz", (2, 3, 4, 5, 6, 3, 2)))
  rng = np.random.default_rng(1)
  x = rng.normal(size=[sizes[c] for c in left]).astype(np.float32)
  w = rng.normal(size=[sizes[c] for c in right]).astype(np.float32)
  graph = helper.make_graph(
      [helper.make_node("Einsum", ["x", "w"], ["y"], equation=equation)], "einsum",
      [helper.make_tensor_value_info("x", tensor.FLOAT, x.shape),
       helper.make_tensor_value_info("w", tensor.FLOAT, w.shape)],
      [helper.make_tensor_value_info("y", tensor.FLOAT, None)])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  assert onnx_rewrites.einsums_to_matmuls(model.graph) == int(matmul)
  assert model.graph.node[0].op_type == ("MatMul" if matmul else "Einsum")
  np.testing.assert_allclose(_run(model, x=x, w=w)[0],
                             np.einsum(equation, x, w), rtol=1e-5, atol=1e-5)


def test_jax2onnx_scans_of_layers_and_of_frames_are_rewritten():
  """A scan over stacked layers whose body scans over frames, converted by jax2onnx: both
  Loops become Scans, outputs equal to JAX's."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import jax2onnx  # noqa: PLC0415

  def frames(weight, x):  # x (T, H): h_t = sigmoid(w) h_{t-1} + x_t
    def step(h, x_t):
      h = jax.nn.sigmoid(weight) * h + x_t
      return h, h
    return jax.lax.scan(step, jnp.zeros(x.shape[1:]), x)[1]

  def layers(weights, x):  # weights (L, H)
    def layer(x, weight):
      return frames(weight, x) @ jnp.eye(x.shape[-1]), None
    return jax.lax.scan(layer, x, weights)[0]

  rng = np.random.default_rng(2)
  weights = rng.normal(size=(3, 4)).astype(np.float32)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  proto = jax2onnx.to_onnx(layers, [weights, x], model_name="scan", opset=17)
  before = _run(proto, **{i.name: v for i, v in zip(proto.graph.input, (weights, x))})
  counts = onnx_rewrites.rewrite(proto)
  assert counts["loops_to_scans"] == 2 and counts["hoist_loop_invariants"] >= 2, counts

  def all_ops(graph):
    ops = [n.op_type for n in graph.node]
    for n in graph.node:
      for attribute in n.attribute:
        if attribute.g.node:
          ops += all_ops(attribute.g)
    return ops

  assert "Loop" not in all_ops(proto.graph) and all_ops(proto.graph).count("Scan") == 2
  # jax2onnx's scan bodies end in Casts of their FLOAT outputs to FLOAT: Identities now.
  assert counts["identity_casts_to_identities"] >= 2 and "Cast" not in all_ops(proto.graph)
  after = _run(proto, **{i.name: v for i, v in zip(proto.graph.input, (weights, x))})
  np.testing.assert_array_equal(after[0], before[0])
  np.testing.assert_allclose(after[0], np.asarray(layers(weights, x)), rtol=1e-5, atol=1e-6)


def _layers_scan_model(layers=3, width=4, stacked_output=True):
  """A Scan over stacked layer weights (initializers): h = tanh(h W_l + b_l), as the stacked
  blocks' Scans are after `loops_to_scans`; the per-layer h stacked as a second output."""
  onnx, tensor, helper = _helpers()
  from onnx import numpy_helper  # noqa: PLC0415

  rng = np.random.default_rng(3)
  weights = rng.normal(size=(layers, width, width)).astype(np.float32)
  biases = rng.normal(size=(layers, width)).astype(np.float32)
  body = helper.make_graph(
      [helper.make_node("MatMul", ["h", "w"], ["hw"]),
       helper.make_node("Add", ["hw", "b"], ["pre"]),
       helper.make_node("Tanh", ["pre"], ["h_next"]),
       helper.make_node("Identity", ["h_next"], ["h_copy"])],
      "layer", [_value("h", [2, width]), _value("w", [width, width]), _value("b", [width])],
      [_value("h_next", [2, width])] + ([_value("h_copy", [2, width])] if stacked_output else []))
  scan = helper.make_node("Scan", ["x", "weights", "biases"],
                          ["y"] + (["every"] if stacked_output else []), body=body,
                          num_scan_inputs=2, name="layers")
  graph = helper.make_graph(
      [scan], "layers", [_value("x", [2, width])],
      [_value("y", [2, width])] + ([_value("every", [layers, 2, width])] if stacked_output
                                   else []),
      initializer=[numpy_helper.from_array(weights, "weights"),
                   numpy_helper.from_array(biases, "biases")])
  del onnx, tensor
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weights, biases


def test_constant_scans_are_unrolled_with_sliced_parameters():
  onnx, _, _ = _helpers()
  model, weights, biases = _layers_scan_model()
  x = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
  before = _run(model, x=x)
  assert onnx_rewrites.unroll_constant_scans(model.graph) == 1
  onnx.checker.check_model(model, full_check=True)
  assert "Scan" not in _op_types(model.graph)
  assert _op_types(model.graph).count("MatMul") == 3
  after = _run(model, x=x)
  h, every = x, []
  for w, b in zip(weights, biases):
    h = np.tanh(h @ w + b)
    every.append(h)
  for got in (before, after):
    np.testing.assert_allclose(got[0], h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], np.stack(every), rtol=1e-5, atol=1e-6)
  # Longer than the bound: kept.
  model, _, _ = _layers_scan_model(layers=5, stacked_output=False)
  assert onnx_rewrites.unroll_constant_scans(model.graph, max_iterations=4) == 0


def _projection_model(bias_as_reshape=True, axis=2, extra_reader=False):
  """x (2, 3, 4) @ W (4, 6) + b, split into 2 + 4 columns along `axis`."""
  onnx, tensor, helper = _helpers()
  from onnx import numpy_helper  # noqa: PLC0415

  rng = np.random.default_rng(5)
  weight = rng.normal(size=(4, 6)).astype(np.float32)
  bias = rng.normal(size=(6,)).astype(np.float32)
  inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b_flat"),
           numpy_helper.from_array(np.array([2, 4], np.int64), "sizes"),
           numpy_helper.from_array(np.array([1, 1, 6], np.int64), "bias_shape")]
  nodes = [helper.make_node("MatMul", ["x", "w"], ["product"])]
  if bias_as_reshape:
    nodes.append(helper.make_node("Reshape", ["b_flat", "bias_shape"], ["b"]))
  nodes += [helper.make_node("Add", ["product", "b" if bias_as_reshape else "b_flat"],
                             ["biased"]),
            helper.make_node("Split", ["biased", "sizes"], ["first", "second"], axis=axis)]
  outputs = [_value("first", [2, 3, 2] if axis == 2 else None),
             _value("second", [2, 3, 4] if axis == 2 else None)]
  if extra_reader:
    nodes.append(helper.make_node("Neg", ["product"], ["minus"]))
    outputs.append(_value("minus", [2, 3, 6]))
  graph = helper.make_graph(nodes, "projection", [_value("x", [2, 3, 4])], outputs,
                            initializer=inits)
  del onnx, tensor
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), weight, bias


@pytest.mark.parametrize("bias_as_reshape", [True, False])
def test_split_projection_becomes_one_matmul_per_piece(bias_as_reshape):
  onnx, _, _ = _helpers()
  model, weight, bias = _projection_model(bias_as_reshape)
  x = np.random.default_rng(6).normal(size=(2, 3, 4)).astype(np.float32)
  before = _run(model, x=x)
  ranks = {"biased": 3}  # What onnx's shape inference gives the rewrite.
  assert onnx_rewrites.split_projections(model.graph, ranks) == 1
  onnx.checker.check_model(model, full_check=True)
  assert "Split" not in _op_types(model.graph) and _op_types(model.graph).count("MatMul") == 2
  after = _run(model, x=x)
  expected = x @ weight + bias
  for got in (before, after):
    np.testing.assert_allclose(got[0], expected[..., :2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], expected[..., 2:], rtol=1e-5, atol=1e-6)


def test_split_projections_that_must_stay():
  # Split along another axis, and a product read by another node too.
  for model in (_projection_model(axis=1)[0], _projection_model(extra_reader=True)[0]):
    assert onnx_rewrites.split_projections(model.graph, {"biased": 3}) == 0
    assert "Split" in _op_types(model.graph)


def _tanh_gelu_model(extra_reader=False, x_late=False):
  """jax.nn.gelu(x, approximate=True) in jax2onnx's node order: ... Tanh -> Add(1) -> Mul(0.5)
  -> Mul(x). `extra_reader`: the halved sum is also an output; `x_late`: the last product's
  other factor is computed after the halving (not x)."""
  _, tensor, helper = _helpers()
  constants = {"three": 3.0, "cubic": 0.044715, "root": float(np.float32(np.sqrt(2 / np.pi))),
               "one": 1.0, "half": 0.5}
  nodes = [helper.make_node("Pow", ["x", "three"], ["cube"]),
           helper.make_node("Mul", ["cubic", "cube"], ["scaled_cube"]),
           helper.make_node("Add", ["x", "scaled_cube"], ["inner"]),
           helper.make_node("Mul", ["root", "inner"], ["argument"]),
           helper.make_node("Tanh", ["argument"], ["tanh"]),
           helper.make_node("Add", ["one", "tanh"], ["one_plus"]),
           helper.make_node("Mul", ["half", "one_plus"], ["cdf"])]
  factor = "x"
  if x_late:
    nodes.append(helper.make_node("Neg", ["x"], ["minus_x"]))
    factor = "minus_x"
  nodes += [helper.make_node("Mul", [factor, "cdf"], ["gelu"]),
            # (onnxruntime fuses no GELU whose result is a graph output.)
            helper.make_node("Mul", ["gelu", "three"], ["y"])]
  outputs = [_value("y", [2, 64])] + ([_value("cdf", [2, 64])] if extra_reader else [])
  graph = helper.make_graph(
      nodes, "gelu", [_value("x", [2, 64])], outputs,
      initializer=[helper.make_tensor(name, tensor.FLOAT, [], [value])
                   for name, value in constants.items()])
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fused_op_types(model, optimize: bool) -> list[str]:
  """The op types onnxruntime runs for `model` (its optimised graph), or with no optimisation."""
  import tempfile  # noqa: PLC0415

  import onnxruntime  # noqa: PLC0415

  onnx, _, _ = _helpers()
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  if not optimize:
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
  with tempfile.TemporaryDirectory() as directory:
    options.optimized_model_filepath = f"{directory}/optimized.onnx"
    onnxruntime.InferenceSession(model.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def _run_unoptimized(model, **feeds):
  import onnxruntime  # noqa: PLC0415

  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
  session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                         providers=["CPUExecutionProvider"])
  return session.run(None, feeds)


def test_tanh_gelu_reordered_bit_identical_and_fused_by_onnxruntime():
  """The swapped products give the same bits as jax2onnx's order when onnxruntime runs the
  operations one by one (normal inputs, |x| up to 30, zeros); with its optimiser on, the
  rewritten graph runs as one FastGelu (the reason for the rewrite) and stays within float32
  rounding of numpy's formula."""
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(2, 64)) * np.array([[0.01], [10.0]])).astype(np.float32)
  x[0, :3] = [0.0, 30.0, -30.0]
  model = _tanh_gelu_model()
  assert "FastGelu" not in _fused_op_types(model, optimize=True)
  before = _run_unoptimized(model, x=x)
  assert onnx_rewrites.gelus_in_fused_order(model.graph) == 1
  after = _run_unoptimized(model, x=x)
  np.testing.assert_array_equal(after[0], before[0])
  assert "FastGelu" in _fused_op_types(model, optimize=True)
  assert "Tanh" not in _fused_op_types(model, optimize=True)
  x64 = x.astype(np.float64)
  reference = 1.5 * x64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x64 + 0.044715 * x64 ** 3)))
  np.testing.assert_allclose(_run(model, x=x)[0], reference, rtol=2e-6, atol=4e-6)


@pytest.mark.parametrize("extra_reader, x_late", [(True, False), (False, True)])
def test_tanh_gelus_that_must_stay(extra_reader, x_late):
  """A halved sum read elsewhere, or a last factor computed after the halving: unchanged."""
  model = _tanh_gelu_model(extra_reader=extra_reader, x_late=x_late)
  nodes = [list(node.input) for node in model.graph.node]
  assert onnx_rewrites.gelus_in_fused_order(model.graph) == 0
  assert [list(node.input) for node in model.graph.node] == nodes


def test_jax2onnx_gelu_is_rewritten_and_equals_jax():
  """jax.nn.gelu (tanh form) through jax2onnx: one GELU reordered, onnxruntime within float32
  rounding of JAX (FastGelu returns -0 where the GELU of a very negative x is ~ -1e-6)."""
  import jax  # noqa: PLC0415
  import jax2onnx  # noqa: PLC0415

  x = np.random.default_rng(6).normal(size=(3, 40)).astype(np.float32) * 3
  proto = jax2onnx.to_onnx(lambda v: jax.nn.gelu(v) * 2.0, [x], model_name="gelu", opset=17)
  assert onnx_rewrites.gelus_in_fused_order(proto.graph) == 1
  np.testing.assert_allclose(_run(proto, **{proto.graph.input[0].name: x})[0],
                             np.asarray(jax.nn.gelu(x) * 2.0), rtol=2e-6, atol=4e-6)


def _cast_scan_model():
  """A Scan of h_i = a_i * h_{i-1} + b_i whose body ends as jax2onnx's do, each output a Cast
  to FLOAT of a FLOAT; the top-level graph adds a Cast FLOAT -> FLOAT (a no-op) and a Cast
  FLOAT -> INT32 (a real conversion, which stays)."""
  onnx, tensor, helper = _helpers()
  body = helper.make_graph(
      [helper.make_node("Mul", ["a_i", "h"], ["ah"]),
       helper.make_node("Add", ["ah", "b_i"], ["h_next"]),
       helper.make_node("Cast", ["h_next"], ["h_fixed"], to=tensor.FLOAT),
       helper.make_node("Cast", ["h_next"], ["h_seq"], to=tensor.FLOAT)],
      "body", [_value("h", [ROWS]), _value("a_i", [ROWS]), _value("b_i", [ROWS])],
      [_value("h_fixed", [ROWS]), _value("h_seq", [ROWS])])
  graph = helper.make_graph(
      [helper.make_node("Scan", ["h0", "a", "b"], ["h_final", "h_all"], body=body,
                        num_scan_inputs=2),
       helper.make_node("Cast", ["h_all"], ["h_all_float"], to=tensor.FLOAT),
       helper.make_node("Mul", ["h_all_float", "ten"], ["scaled"]),
       helper.make_node("Cast", ["scaled"], ["scaled_int"], to=tensor.INT32)],
      "casts", [_value("a", [STEPS, ROWS]), _value("b", [STEPS, ROWS])],
      [_value("h_final", [ROWS]), _value("h_all_float", [STEPS, ROWS]),
       helper.make_tensor_value_info("scaled_int", tensor.INT32, [STEPS, ROWS])],
      initializer=[helper.make_tensor("h0", tensor.FLOAT, [ROWS], [0.5] * ROWS),
                   helper.make_tensor("ten", tensor.FLOAT, [], [10.0])])
  del onnx
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_identity_casts_become_identities_with_the_same_outputs():
  """The three Casts to FLOAT of a FLOAT (two in the Scan body, one a graph output) become
  Identities, the Cast to INT32 stays; outputs bit-identical and equal to a numpy loop."""
  onnx, tensor, _ = _helpers()
  a, b = _inputs()
  model = _cast_scan_model()
  before = _run(model, a=a, b=b)
  assert onnx_rewrites.identity_casts_to_identities(
      model.graph, onnx_rewrites._element_types(model)) == 3  # pylint: disable=protected-access
  onnx.checker.check_model(model, full_check=True)
  body = model.graph.node[0].attribute[0].g
  assert _op_types(body) == ["Add", "Identity", "Identity", "Mul"]
  (cast,) = [n for n in model.graph.node if n.op_type == "Cast"]
  assert cast.attribute[0].i == tensor.INT32
  after = _run(model, a=a, b=b)
  for got, want in zip(after, before):
    np.testing.assert_array_equal(got, want)
  final, states = _numpy_scan(a, b)
  np.testing.assert_allclose(after[0], final, rtol=1e-6)
  np.testing.assert_allclose(after[1], states, rtol=1e-6)
  np.testing.assert_array_equal(after[2], (states * 10).astype(np.int32))
