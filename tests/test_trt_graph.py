"""What TensorRT gets from the gpu-form graph, checked without a GPU or TensorRT.

- The parser reads a copy of ``model.onnx`` with ``TRT_decomposable=1`` on every Attention node, while
  the published file stays standard ONNX that ONNX Runtime loads (``trt_build.parser_graph``).
- The build, driven through a stand-in for the ``tensorrt`` module that records every call: a strongly
  typed network, no precision flags, no layer pinned (the graph has int64 Reduce layers a pin by kind
  would hit), and a timing cache TensorRT refuses replaced instead of failing the build.
- The fp16 graph's rotary angles: float32 from the Cast of the int64 positions to Cos/Sin, finite and
  exact to float32 rounding at positions up to 131,072 in ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import types

import numpy as np
import onnx
import onnx.utils
import pytest
from onnx import numpy_helper

from dewey_export import trt_build
from dewey_export.trt_build import DECOMPOSABLE_ATTRIBUTE, TensorRTTarget, parser_graph
from dewey_export.trt_precision import precision_plan
from runtimes.export_format import ONNX_FILE
from runtimes.trt_plan import plan_profiles

ort = pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")

# Dewey's max_position_embeddings: the longest position a rotary table must hold.
LONGEST_POSITION = 131072
# Float32 rounding of an angle near 131,072 rad is half an ulp, 2**-8 (about 0.004 rad); cos/sin move by
# at most that much. fp16 angles would be off by whole radians above 2,048 and inf above 65,504.
ROTARY_ATOL = 1e-2
# A row longer than fp16 holds exact integer positions (2,048), short enough for the whole graph on the
# CPU (its global attention is quadratic there: 16,384 tokens took 5.4 GB).
PAST_FP16_INTEGERS = 4100


@pytest.fixture(scope="module")
def fp16_graph(checkpoint, tmp_path_factory):
    """The tiny checkpoint's fp16 gpu-target export (opset 23: Attention and RotaryEmbedding nodes)."""
    from dewey_export.onnx_export import OnnxTarget
    from dewey_export.pipeline import export

    folder = tmp_path_factory.mktemp("gpu-fp16") / "export"
    return export(checkpoint, folder, OnnxTarget(form="gpu", precision="fp16"), verify=False, log=lambda m: None).folder


def attention_nodes(model: onnx.ModelProto) -> list:
    return [node for node in model.graph.node if node.op_type == "Attention"]


def decomposable(node) -> int | None:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == DECOMPOSABLE_ATTRIBUTE), None)


def typed(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of ``model`` (after shape inference), by name."""
    model = onnx.shape_inference.infer_shapes(model)
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    types_by_name = {value.name: value.type.tensor_type.elem_type for value in values}
    types_by_name.update({initializer.name: initializer.data_type for initializer in model.graph.initializer})
    return types_by_name


# ----------------------------------------------------------------------------------------------------
# The graph the parser reads
# ----------------------------------------------------------------------------------------------------


def test_parser_graph_marks_every_attention_node_decomposable(fp16_graph):
    published = onnx.load(str(fp16_graph / ONNX_FILE))
    parsed = onnx.load_from_string(parser_graph(fp16_graph / ONNX_FILE))
    assert attention_nodes(published) and [decomposable(n) for n in attention_nodes(parsed)] == [1] * len(
        attention_nodes(published))
    for node in attention_nodes(parsed):  # nothing else changed
        del node.attribute[-1]
    assert parsed == published


def test_the_published_graph_stays_standard_onnx_for_onnx_runtime(fp16_graph):
    published = onnx.load(str(fp16_graph / ONNX_FILE))
    assert all(decomposable(node) is None for node in attention_nodes(published))
    ort.InferenceSession(str(fp16_graph / ONNX_FILE), providers=["CPUExecutionProvider"])
    # Why the attribute goes only into the parser's copy: ONNX Runtime refuses it.
    with pytest.raises(Exception, match=f"Unrecognized attribute: {DECOMPOSABLE_ATTRIBUTE}"):
        ort.InferenceSession(parser_graph(fp16_graph / ONNX_FILE), providers=["CPUExecutionProvider"])


def test_parser_graph_leaves_external_weights_beside_the_published_file(fp16_graph, tmp_path):
    """A graph over protobuf's 2 GB limit keeps its weights in model.onnx.data: the copy only points at
    them, and the parser is given the published file's path to find them."""
    path = tmp_path / ONNX_FILE
    onnx.save(onnx.load(str(fp16_graph / ONNX_FILE)), str(path), save_as_external_data=True,
              location=ONNX_FILE + ".data", size_threshold=0)
    parsed = onnx.load_from_string(parser_graph(path))
    external = [i for i in parsed.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(not i.raw_data for i in external)
    assert {entry.value for i in external for entry in i.external_data if entry.key == "location"} == {
        ONNX_FILE + ".data"}


# ----------------------------------------------------------------------------------------------------
# The build, through a stand-in for tensorrt
# ----------------------------------------------------------------------------------------------------

# ONNX operators and the tensorrt.LayerType names the parser makes of them (the ones a pin touched).
LAYER_KINDS = {"LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "ReduceSum": "REDUCE",
               "ReduceMax": "REDUCE", "CumSum": "CUMULATIVE", "Attention": "ATTENTION"}
INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL}


class FakeLayer:
    """A network layer made from one ONNX node; any precision or output type set on it is recorded."""

    def __init__(self, node, input_types):
        self.type = LAYER_KINDS.get(node.op_type, node.op_type)
        self.input_types = input_types
        self.pins = []

    @property
    def precision(self):
        return None

    @precision.setter
    def precision(self, value):
        self.pins.append(("precision", value))

    def set_output_type(self, index, value):
        self.pins.append((f"output {index}", value))


class FakeTensorRT:
    """The part of the tensorrt module the builder uses, recording what it is asked to do.

    A timing cache whose bytes start with ``foreign_cache`` is refused by ``set_timing_cache``, as
    TensorRT refuses one written on another GPU; ``get_timing_cache`` answers None, as TensorRT may.
    """

    NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)
    BuilderFlag = types.SimpleNamespace(**{name: name for name in (
        "FP16", "BF16", "TF32", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "VERSION_COMPATIBLE")})
    MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    foreign_cache = b"timings of another GPU"

    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    def __init__(self):
        self.network_flags, self.set_flags, self.cleared_flags, self.layers = None, [], [], []
        self.parsed, self.attached = None, []

    def Builder(self, logger):  # noqa: N802 - the tensorrt API's name
        fake = self

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data

        class Config:
            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                fake.set_flags.append(flag)

            def clear_flag(self, flag):
                fake.cleared_flags.append(flag)

            def add_optimization_profile(self, profile):
                pass

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                accepted = ignore_mismatch or not cache.data.startswith(fake.foreign_cache)
                if accepted:
                    fake.attached.append(cache)
                return accepted

            def get_timing_cache(self):
                return None

        class Builder:
            def create_network(self, flags):
                fake.network_flags = flags
                return types.SimpleNamespace(num_layers=0)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return types.SimpleNamespace(set_shape=lambda name, low, opt, high: None)

            def build_serialized_network(self, network, config):
                for cache in fake.attached[-1:]:  # the builder adds its timings to the attached cache
                    cache.data += b" + new timings"
                return b"serialized engine"

        return Builder()

    def OnnxParser(self, network, logger):  # noqa: N802 - the tensorrt API's name
        fake = self

        class Parser:
            num_errors = 0

            def parse(self, model, path=None):
                fake.parsed = (onnx.load_from_string(bytes(model)), path)
                types_by_name = typed(fake.parsed[0])
                fake.layers = [FakeLayer(node, [types_by_name.get(i) for i in node.input if i])
                               for node in fake.parsed[0].graph.node]
                network.num_layers = len(fake.layers)
                network.get_layer = fake.layers.__getitem__
                return True

        return Parser()


def build(fp16_graph, tmp_path, version="10.15.1.29", precision="fp16", cache=None, **settings):
    """Run the builder's TensorRT part on ``fp16_graph`` with a fake tensorrt; returns (fake, engine, log)."""
    fake, log = FakeTensorRT(), []
    cache_path = tmp_path / "timing.cache"
    if cache is not None:
        cache_path.write_bytes(cache)
    engine = trt_build._serialize_engine(
        fake, fp16_graph / ONNX_FILE, precision_plan(precision, version), plan_profiles([(512, 8), (2048, 1)], 8192),
        TensorRTTarget(precision=precision, **settings), cache_path, log.append)
    return fake, engine, log


@pytest.mark.parametrize("version, precision", [("10.15.1.29", "fp16"), ("10.16.1", "bf16"), ("11.3.0", "fp16"),
                                                ("11.0.0.post1", "fp32")])
def test_the_build_is_strongly_typed_with_no_precision_flags(fp16_graph, tmp_path, version, precision):
    fake, engine, _ = build(fp16_graph, tmp_path, version, precision)
    assert engine == b"serialized engine"
    assert fake.network_flags == 1 << FakeTensorRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert fake.set_flags == []
    assert fake.cleared_flags == (["TF32"] if precision == "fp32" else [])


def test_version_compatible_is_the_only_flag_ever_set(fp16_graph, tmp_path):
    fake, _, _ = build(fp16_graph, tmp_path, version_compatible=True)
    assert fake.set_flags == ["VERSION_COMPATIBLE"]


def test_the_parser_gets_the_decomposable_copy_and_the_published_path(fp16_graph, tmp_path):
    fake, _, _ = build(fp16_graph, tmp_path)
    model, path = fake.parsed
    assert path == str(fp16_graph / ONNX_FILE)  # where its external weights would be
    assert attention_nodes(model) and all(decomposable(node) == 1 for node in attention_nodes(model))


def test_no_layer_is_pinned_and_none_with_an_integer_input(fp16_graph, tmp_path):
    fake, _, _ = build(fp16_graph, tmp_path)
    integer_reduce = [layer for layer in fake.layers
                      if layer.type == "REDUCE" and INTEGER_TYPES & set(layer.input_types)]
    assert integer_reduce, "the graph has int64 Reduce layers: a pin of every REDUCE layer would hit them"
    assert all(None not in layer.input_types for layer in fake.layers)  # every input type is known
    assert [layer.type for layer in fake.layers if layer.pins] == []


def test_a_refused_timing_cache_costs_its_timings_not_the_build(fp16_graph, tmp_path):
    _, engine, log = build(fp16_graph, tmp_path, cache=FakeTensorRT.foreign_cache)
    assert engine == b"serialized engine"
    assert any("another GPU or TensorRT version" in line for line in log)
    assert (tmp_path / "timing.cache").read_bytes() == b" + new timings"  # a fresh cache, filled by the build


def test_a_matching_timing_cache_is_used_and_saved_with_the_new_timings(fp16_graph, tmp_path):
    _, _, log = build(fp16_graph, tmp_path, cache=b"timings of this GPU")
    assert (tmp_path / "timing.cache").read_bytes() == b"timings of this GPU + new timings"
    assert not any("another GPU" in line for line in log)


# ----------------------------------------------------------------------------------------------------
# The fp16 graph's rotary angles
# ----------------------------------------------------------------------------------------------------


def rotary_nodes(model: onnx.ModelProto) -> list:
    return [node for node in model.graph.node if node.op_type in ("Cos", "Sin")]


def test_rotary_angles_stay_float32_from_the_cast_of_the_positions_to_cos_sin(fp16_graph):
    """Strongly typed TensorRT computes each tensor in its graph type: in the fp16 graph, the positions
    are int64 up to a Cast to float32, and the angles stay float32 into every Cos/Sin."""
    model = onnx.load(str(fp16_graph / ONNX_FILE))
    types_by_name = typed(model)
    producer = {output: node for node in model.graph.node for output in node.output}
    initializers = {initializer.name for initializer in model.graph.initializer}
    assert rotary_nodes(model)
    for node in rotary_nodes(model):
        name, chain = node.input[0], []
        while producer[name].op_type != "Cast":  # back along the angle to the Cast of the positions
            chain.append(name)
            name = next(i for i in producer[name].input if i not in initializers)
        cast = producer[name]
        assert onnx.helper.get_attribute_value(cast.attribute[0]) == onnx.TensorProto.FLOAT
        assert [types_by_name[n] for n in [*chain, name]] == [onnx.TensorProto.FLOAT] * (len(chain) + 1)
        assert types_by_name[cast.input[0]] == onnx.TensorProto.INT64
        above, frontier = {}, [cast.input[0]]  # the int64 side comes from the Range of positions
        while frontier:
            node_above = producer.get(frontier.pop())
            if node_above is not None and node_above.name not in above:
                above[node_above.name] = node_above.op_type
                frontier.extend(node_above.input)
        assert "Range" in above.values()


def test_rotary_tables_are_finite_and_exact_to_position_131072_in_onnx_runtime(fp16_graph):
    """The part of the fp16 graph that computes the rotary tables, run by ONNX Runtime's CPU provider
    for one row of 131,072 tokens (the whole graph would need quadratic memory in its global attention
    on the CPU), against float64 cos/sin of position x inv_freq."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(fp16_graph / ONNX_FILE)))
    tables = [node.output[0] for node in rotary_nodes(model)]
    part = onnx.utils.Extractor(model).extract_model(["attention_mask", "span_bounds"], tables)
    session = ort.InferenceSession(part.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(tables, {"attention_mask": np.ones((1, LONGEST_POSITION), np.int64),
                                   "span_bounds": np.zeros((1, 1, 2), np.int64)})
    producer = {output: node for node in model.graph.node for output in node.output}
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    positions = np.arange(LONGEST_POSITION, dtype=np.float64)[None, :, None]
    for node, values in zip(rotary_nodes(model), outputs):
        inv_freq = next(weights[i] for i in producer[node.input[0]].input if i in weights).astype(np.float64)
        expected = (np.cos if node.op_type == "Cos" else np.sin)(positions * inv_freq)
        assert values.dtype == np.float32 and np.isfinite(values).all()
        assert np.abs(values - expected).max() < ROTARY_ATOL, node.name
    # What fp16 would have made of the far positions: inf, so NaN tables.
    assert np.isinf(np.float16(LONGEST_POSITION - 1))


def test_the_fp16_graph_gives_finite_vectors_past_fp16_integer_positions(fp16_graph, checkpoint):
    from runtimes.backends.torch_backend import TorchBackend

    rng = np.random.default_rng(0)
    ids = rng.integers(10, 1000, (1, PAST_FP16_INTEGERS))
    mask = np.ones_like(ids)
    bounds = np.array([[[1, PAST_FP16_INTEGERS - 1], [PAST_FP16_INTEGERS - 64, PAST_FP16_INTEGERS - 1]]])
    session = ort.InferenceSession(str(fp16_graph / ONNX_FILE), providers=["CPUExecutionProvider"])
    cls, spans = session.run(["cls", "spans"], {"input_ids": ids, "attention_mask": mask, "span_bounds": bounds})
    assert np.isfinite(cls).all() and np.isfinite(spans).all()
    ref_cls, ref_spans = TorchBackend.from_folder(checkpoint).forward(ids, mask, bounds)
    for got, ref in ((cls, ref_cls), (spans, ref_spans)):
        got, ref = got.reshape(-1, got.shape[-1]), ref.reshape(-1, ref.shape[-1])
        cosine = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
        assert cosine.min() >= 0.999


def test_a_parser_rejection_exits_2_in_one_line_and_writes_nothing(checkpoint, tmp_path, monkeypatch):
    """TensorRT's parser refusing the graph is an ExportError (before, an uncaught RuntimeError: a
    traceback), reported by dewey-export trt in one line with the parser's own message."""
    import sys

    from click.testing import CliRunner

    from dewey_export.cli import main

    class RejectingParser:
        num_errors = 1

        def parse(self, model, path=None):
            return False

        def get_error(self, index):
            return "Attention: no kernel for this head size"

    fake = FakeTensorRT()
    fake.__version__ = "10.15.1.29"
    fake.OnnxParser = lambda network, logger: RejectingParser()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build, "tensorrt_status", lambda: None)
    monkeypatch.setattr(trt_build, "gpu_identity", lambda: ("Stand-in GPU", "9.0"))
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["trt", "--model", str(checkpoint), "--out", str(out), "--buckets", "512x8",
                                       "--timing-cache", str(tmp_path / "timing.cache")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "parser rejected" in errors[0] and "no kernel for this head size" in errors[0]
    assert "Traceback" not in result.output and not out.exists()
