"""TensorRT planning without TensorRT: profiles from length buckets, engine metadata and the
compatibility check (runtimes.trt_plan), precision names (runtimes.precision) and the builder's
precision plan by TensorRT version (dewey_export.trt_precision).

No GPU and no ``tensorrt`` here: the installed TensorRT version is faked as a string, which is all the
builder and backend read from it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from dewey_export.trt_precision import FP32_LAYER_KINDS, PrecisionPlan, precision_plan
from runtimes.chunking import token_windows
from runtimes.export_format import INPUTS
from runtimes.precision import FULL_NAMES, PRECISIONS, precision_name
from runtimes.trt_plan import (
    DEFAULT_BUCKETS,
    DEFAULT_TOKEN_BUDGET,
    ENGINE_FILE,
    METADATA_FILE,
    REBUILD_COMMAND,
    EngineMetadata,
    EngineMismatchError,
    Profile,
    check_engine_compatible,
    format_buckets,
    max_chunks_for,
    parse_buckets,
    parse_tensorrt_version,
    plan_profiles,
    select_profile,
)

MAX_POSITIONS = 131072


@pytest.fixture(scope="module")
def default_profiles():
    return plan_profiles(DEFAULT_BUCKETS, MAX_POSITIONS, token_budget=DEFAULT_TOKEN_BUDGET)


# ----------------------------------------------------------------------------------------------------
# Profiles from buckets
# ----------------------------------------------------------------------------------------------------


def test_one_profile_per_bucket_with_opt_at_the_bucket_max(default_profiles):
    assert len(default_profiles) == len(DEFAULT_BUCKETS)
    for profile, (length, batch) in zip(default_profiles, DEFAULT_BUCKETS):
        assert profile.sequence[1:] == (length, length)
        assert profile.batch == (1, batch, batch)
        assert profile.chunks[0] == 1 and profile.chunks[1] <= profile.chunks[2]


@pytest.mark.parametrize("buckets", [DEFAULT_BUCKETS, [(100, 8)], [(64, 16), (65, 16), (4096, 2), (5000, 1)]])
def test_sequence_ranges_are_contiguous_without_gap_or_overlap(buckets):
    profiles = plan_profiles(buckets, MAX_POSITIONS)
    assert profiles[0].sequence[0] == 1
    for before, after in zip(profiles, profiles[1:]):
        assert after.sequence[0] == before.sequence[2] + 1
    assert profiles[-1].sequence[2] == buckets[-1][0]


def test_every_length_selects_exactly_one_profile_at_batch_one():
    buckets = [(512, 64), (2048, 8), (5000, 1)]
    profiles = plan_profiles(buckets, 8192)
    bounds = [0] + [length for length, _ in buckets]
    for seq in range(1, 5001):
        covering = [i for i, p in enumerate(profiles) if p.covers(1, seq, 1)]
        assert len(covering) == 1, seq
        index = select_profile(profiles, 1, seq, 1)
        assert covering == [index]
        assert bounds[index] < seq <= bounds[index + 1]


def test_select_profile_takes_the_batch_into_account(default_profiles):
    assert select_profile(default_profiles, 64, 512, 1) == 0
    assert select_profile(default_profiles, 4, 513, 1) == 1
    assert select_profile(default_profiles, 1, 131072, 1) == 3
    expected = r"batch 8, sequence 600, chunks 1.*profile 1: batch 1\.\.4, sequence 513\.\.8192"
    with pytest.raises(ValueError, match=expected):
        select_profile(default_profiles, 8, 600, 1)


@pytest.mark.parametrize("shape", [(1, 131073, 1), (1, 0, 1), (0, 10, 1), (1, 10, 0), (1, 512, 10_000)])
def test_shapes_outside_every_profile_are_refused(default_profiles, shape):
    with pytest.raises(ValueError, match="no optimization profile"):
        select_profile(default_profiles, *shape)


def test_select_profile_needs_profiles():
    with pytest.raises(ValueError, match="no optimization profiles"):
        select_profile([], 1, 1, 1)


def test_the_last_bucket_may_stop_below_max_positions():
    profiles = plan_profiles([(512, 8), (4096, 1)], MAX_POSITIONS)
    assert select_profile(profiles, 1, 4096, 1) == 1
    with pytest.raises(ValueError, match="sequence 4097"):
        select_profile(profiles, 1, 4097, 1)


def test_batch_never_grows_with_length(default_profiles):
    batches = [p.batch[2] for p in default_profiles]
    assert batches == sorted(batches, reverse=True)


def test_token_budget_respected_except_for_single_rows(default_profiles):
    for profile in default_profiles:
        if profile.batch[2] > 1:
            assert profile.batch[2] * profile.sequence[2] <= DEFAULT_TOKEN_BUDGET
    # One row of 131,072 tokens is over the budget but cannot be split: allowed.
    assert default_profiles[-1].sequence[2] * default_profiles[-1].batch[2] > DEFAULT_TOKEN_BUDGET


def test_inputs_share_batch_and_sequence_ranges_within_a_profile(default_profiles):
    for profile in default_profiles:
        shapes = profile.shapes()
        assert set(shapes) == set(INPUTS)
        for name, (low, opt, high) in shapes.items():
            assert len(low) == len(opt) == len(high) == len(INPUTS[name][1])
            assert all(a <= b <= c for a, b, c in zip(low, opt, high))
        batch = {name: tuple(s[0] for s in shapes[name]) for name in INPUTS}
        assert len(set(batch.values())) == 1
        assert batch["input_ids"] == profile.batch
        sequence = {name: tuple(s[1] for s in shapes[name]) for name in ("input_ids", "attention_mask")}
        assert sequence["input_ids"] == sequence["attention_mask"] == profile.sequence
        assert tuple(s[1] for s in shapes["span_bounds"]) == profile.chunks
        assert tuple(s[2] for s in shapes["span_bounds"]) == (2, 2, 2)


def test_shapes_of_the_first_default_profile(default_profiles):
    shapes = default_profiles[0].shapes()
    assert shapes["input_ids"] == ((1, 1), (64, 512), (64, 512))
    assert shapes["span_bounds"] == ((1, 1, 2), (64, 4, 2), (64, 17, 2))


@pytest.mark.parametrize("length", [1, 31, 32, 33, 512, 8192, 131072])
def test_chunk_axis_holds_every_late_chunking_window(length):
    stride = 32
    max_c = plan_profiles([(length, 1)], MAX_POSITIONS, chunk_stride=stride)[0].chunks[2]
    assert max_c == max_chunks_for(length, stride)
    for chunk_size, overlap in ((32, 0), (64, 32), (256, 64), (40, 8)):
        assert chunk_size - overlap >= stride
        assert len(token_windows(length, chunk_size, overlap)) <= max_c


def test_profile_dict_round_trip(default_profiles):
    for profile in default_profiles:
        data = json.loads(json.dumps(profile.to_dict()))
        assert Profile.from_dict(data) == profile


@pytest.mark.parametrize("data, message", [
    ({"batch": [1, 2, 2], "sequence": [1, 8, 8]}, "missing chunks"),
    ({"batch": [2, 1, 4], "sequence": [1, 8, 8], "chunks": [1, 1, 1]}, "min <= opt <= max"),
    ({"batch": [0, 1, 4], "sequence": [1, 8, 8], "chunks": [1, 1, 1]}, "batch min must be >= 1"),
    ({"batch": [1, 4], "sequence": [1, 8, 8], "chunks": [1, 1, 1]}, "triple"),
    ({"batch": [1, 1, 1.5], "sequence": [1, 8, 8], "chunks": [1, 1, 1]}, "must be an integer"),
    ([1, 2, 3], "must be an object"),
])
def test_bad_profile_dicts_rejected(data, message):
    with pytest.raises((TypeError, ValueError), match=message):  # TypeError: wrong type
        Profile.from_dict(data)


@pytest.mark.parametrize("buckets, kwargs, message", [
    ([], {}, "empty"),
    ([(512, 0)], {}, "max_batch must be >= 1"),
    ([(0, 4)], {}, "max_length must be >= 1"),
    ([(-512, 4)], {}, "max_length must be >= 1"),
    ([(512.0, 4)], {}, "max_length must be an integer"),
    ([(512, True)], {}, "max_batch must be an integer"),
    ([(512, 4, 1)], {}, r"\(max_length, max_batch\) pair"),
    ([(512, 8), (512, 4)], {}, "strictly increasing"),
    ([(8192, 4), (512, 64)], {}, "strictly increasing"),
    ([(512, 4), (8192, 8)], {}, "must not grow"),
    ([(512, 8), (262144, 1)], {}, "above the model's max_position_embeddings"),
    ([(512, 128)], {"token_budget": 32768}, "over the token budget of 32768; lower its batch to 64"),
    ([(512, 8)], {"chunk_stride": 0}, "chunk_stride must be >= 1"),
    ([(512, 8)], {"token_budget": 0}, "token_budget must be >= 1"),
])
def test_invalid_bucket_settings_rejected(buckets, kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):  # TypeError: wrong type
        plan_profiles(buckets, MAX_POSITIONS, **kwargs)


def test_invalid_max_positions_rejected():
    with pytest.raises(ValueError, match="max_position_embeddings must be >= 1"):
        plan_profiles(DEFAULT_BUCKETS, 0)


def test_parse_buckets_and_round_trip():
    text = "512x64,8192x4,32768x1,131072x1"
    assert parse_buckets(text) == list(DEFAULT_BUCKETS)
    assert format_buckets(parse_buckets(text)) == text
    assert parse_buckets(format_buckets(DEFAULT_BUCKETS)) == list(DEFAULT_BUCKETS)
    assert parse_buckets(" 512 X 64 , 8192x4 ") == [(512, 64), (8192, 4)]


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("512x64,", "item 2 is empty"),
    ("512", "item 1 '512' is not MAX_LENGTHxMAX_BATCH"),
    ("512x64x2", "not MAX_LENGTHxMAX_BATCH"),
    ("512*64", "not MAX_LENGTHxMAX_BATCH"),
    ("512x-4", "not MAX_LENGTHxMAX_BATCH"),
    ("512x4.5", "not MAX_LENGTHxMAX_BATCH"),
    ("ax4", "not MAX_LENGTHxMAX_BATCH"),
    ("0x4", "length and batch must be >= 1"),
    ("512x0", "length and batch must be >= 1"),
    ("8192x4,512x64", "strictly increasing"),
    ("512x4,8192x8", "must not grow"),
])
def test_parse_buckets_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_buckets(text)


# ----------------------------------------------------------------------------------------------------
# Precision names
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling, name", [
    ("fp32", "fp32"), ("float32", "fp32"), (np.float32, "fp32"), (np.dtype("float32"), "fp32"),
    ("fp16", "fp16"), ("float16", "fp16"), (np.float16, "fp16"), (np.dtype("float16"), "fp16"),
    ("bf16", "bf16"), ("bfloat16", "bf16"),
])
def test_precision_name_accepts_every_alias(spelling, name):
    assert precision_name(spelling) == name


def test_precision_name_accepts_torch_dtypes():
    torch = pytest.importorskip("torch")
    assert [precision_name(getattr(torch, full)) for full in FULL_NAMES.values()] == list(PRECISIONS)
    assert precision_name(torch.half) == "fp16"


def test_precision_name_accepts_the_bfloat16_numpy_type():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert precision_name(ml_dtypes.bfloat16) == "bf16"


@pytest.mark.parametrize("value", ["int8", "FP16", "float", "float64", "torch.float32", "", None, 16, True,
                                   np.float64, float, object()])
def test_precision_name_refuses_anything_else(value):
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        precision_name(value)


# ----------------------------------------------------------------------------------------------------
# Precision plan by TensorRT version
# ----------------------------------------------------------------------------------------------------

TRT10 = ["10.0.0b6", "10.14.1.48", "10.16.1"]
TRT11 = ["11.0.0.post1", "11.3.0", "11.4.1.2"]


@pytest.mark.parametrize("version", TRT10)
@pytest.mark.parametrize("precision, flag", [("fp16", "FP16"), ("bf16", "BF16")])
def test_trt10_weak_typing_uses_builder_flags_on_an_fp32_graph(version, precision, flag):
    plan = precision_plan(precision, version)
    assert plan == PrecisionPlan(precision, (flag, "OBEY_PRECISION_CONSTRAINTS"), False, "fp32",
                                 FP32_LAYER_KINDS, ())
    assert {"NORMALIZATION", "SOFTMAX"} <= set(plan.fp32_layers)


@pytest.mark.parametrize("version", TRT11)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_trt11_strong_typing_puts_precision_in_the_graph(version, precision):
    plan = precision_plan(precision, version)
    assert plan.builder_flags == ()
    assert plan.strongly_typed is True
    assert plan.graph_precision == precision
    assert plan.fp32_layers == ()
    # None of the flags TensorRT 11 removed may appear.
    removed = {"FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}
    assert not removed & set(plan.builder_flags)


@pytest.mark.parametrize("version, strong", [(v, False) for v in TRT10] + [(v, True) for v in TRT11])
def test_fp32_has_no_precision_flags_and_no_tf32(version, strong):
    plan = precision_plan("fp32", version)
    assert plan == PrecisionPlan("fp32", (), strong, "fp32", (), ("TF32",))


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0.post12.dev1", "7.2.3.4"])
def test_tensorrt_below_10_rejected(version):
    with pytest.raises(ValueError, match="TensorRT >= 10 required"):
        precision_plan("fp16", version)


@pytest.mark.parametrize("version", ["", "ten", "10", "10.x", "v10.1.0", "10.1.0-garbage", None, 10.1])
def test_unreadable_versions_rejected(version):
    with pytest.raises(ValueError, match="cannot read the TensorRT version"):
        precision_plan("fp16", version)


@pytest.mark.parametrize("precision", ["int8", "FP16", "", None])
def test_unknown_precision_rejected(precision):
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        precision_plan(precision, "10.14.1.48")


def test_precision_plan_takes_any_spelling():
    assert precision_plan("bfloat16", "11.3.0") == precision_plan("bf16", "11.3.0")


@pytest.mark.parametrize("text, parsed", [
    ("10.14.1.48", (10, 14, 1, 48)), ("11.3.0", (11, 3, 0, 0)), ("11.0.0.post1", (11, 0, 0, 0)),
    ("10.0.0b6", (10, 0, 0, 0)), ("10.8", (10, 8, 0, 0)), ("10.3.0+cuda12", (10, 3, 0, 0)),
])
def test_parse_tensorrt_version(text, parsed):
    assert parse_tensorrt_version(text) == parsed


# ----------------------------------------------------------------------------------------------------
# Engine metadata and compatibility
# ----------------------------------------------------------------------------------------------------

SHA = "ab" * 32


def make_meta(**changes) -> EngineMetadata:
    fields = dict(tensorrt_version="10.14.1.48", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0",
                  precision="fp16", profiles=plan_profiles(DEFAULT_BUCKETS, MAX_POSITIONS), onnx_sha256=SHA,
                  version_compatible=False, created_by="dewey 0.1.0")
    fields.update(changes)
    return EngineMetadata(**fields)


def test_file_names():
    assert (ENGINE_FILE, METADATA_FILE) == ("model.plan", "engine.json")


def test_metadata_json_round_trip(tmp_path):
    meta = make_meta(version_compatible=True, compute_capability=(9, 0))
    assert meta.compute_capability == "9.0"
    text = meta.to_json()
    assert json.loads(text)["profiles"][0] == {"batch": [1, 64, 64], "sequence": [1, 512, 512], "chunks": [1, 4, 17]}
    again = EngineMetadata.from_json(text)
    assert again == meta
    assert again.profiles == plan_profiles(DEFAULT_BUCKETS, MAX_POSITIONS)
    path = meta.write(tmp_path)
    assert path.name == METADATA_FILE
    assert EngineMetadata.read(tmp_path) == meta


def _json_with(**changes) -> str:
    data = json.loads(make_meta().to_json())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    return json.dumps(data)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (_json_with(tensorrt_version=...), "missing tensorrt_version"),
    (_json_with(profiles=..., onnx_sha256=...), "missing profiles, onnx_sha256"),
    (_json_with(format=2), "unknown engine metadata format 2"),
    (_json_with(precision="int4"), "precision must be one of"),
    (_json_with(compute_capability="sm90"), "compute_capability must be like"),
    (_json_with(tensorrt_version="latest"), "cannot read the TensorRT version"),
    (_json_with(onnx_sha256="abc"), "onnx_sha256 must be 64"),
    (_json_with(version_compatible="yes"), "version_compatible must be true or false"),
    (_json_with(gpu_name=""), "gpu_name must be a non-empty string"),
    (_json_with(profiles=[]), "profiles must be a non-empty list"),
    (_json_with(profiles={"batch": [1, 1, 1]}), "profiles must be a list"),
    (_json_with(profiles=[{"batch": [1, 1, 1], "sequence": [1, 8, 8]}]), "profile is missing chunks"),
])
def test_malformed_metadata_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        EngineMetadata.from_json(text)


def test_reading_a_missing_metadata_file_says_how_to_build(tmp_path):
    with pytest.raises(ValueError, match="dewey-export --model CHECKPOINT --to trt --out DIR"):
        EngineMetadata.read(tmp_path)


def test_same_machine_is_compatible():
    meta = make_meta()
    assert check_engine_compatible(meta, "10.14.1.48", "NVIDIA H100 80GB HBM3", "9.0") == []
    # A packaging tag on the same release is the same TensorRT.
    assert check_engine_compatible(meta, "10.14.1.48.post1", "NVIDIA H100 80GB HBM3", (9, 0)) == []


@pytest.mark.parametrize("installed", ["10.14.1.49", "10.15.1.29", "10.13.0.35", "11.0.0"])
def test_a_normal_engine_needs_the_exact_tensorrt_version(installed):
    with pytest.raises(EngineMismatchError) as info:
        check_engine_compatible(make_meta(), installed, "NVIDIA H100 80GB HBM3", "9.0")
    message = str(info.value)
    assert info.value.fields == ("tensorrt_version",)
    assert "tensorrt_version" in message and "10.14.1.48" in message and installed in message
    assert REBUILD_COMMAND in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("capability", ["8.0", "8.9", (10, 0)])
def test_another_compute_capability_is_refused(capability):
    with pytest.raises(EngineMismatchError) as info:
        check_engine_compatible(make_meta(), "10.14.1.48", "NVIDIA A100-SXM4-80GB", capability)
    message = str(info.value)
    assert info.value.fields == ("compute_capability",)
    assert "compute_capability" in message and "9.0" in message
    assert REBUILD_COMMAND in message


def test_every_mismatch_is_named():
    with pytest.raises(EngineMismatchError) as info:
        check_engine_compatible(make_meta(), "10.15.1.29", "NVIDIA A100-SXM4-80GB", "8.0")
    assert info.value.fields == ("tensorrt_version", "compute_capability")


def test_another_gpu_with_the_same_compute_capability_runs_with_a_note():
    meta = make_meta()
    notes = check_engine_compatible(meta, "10.14.1.48", "NVIDIA H100 PCIe", "9.0")
    assert len(notes) == 1 and "NVIDIA H100 PCIe" in notes[0] and "NVIDIA H100 80GB HBM3" in notes[0]
    with pytest.raises(EngineMismatchError, match="gpu_name") as info:
        check_engine_compatible(meta, "10.14.1.48", "NVIDIA H100 PCIe", "9.0", strict_gpu=True)
    assert info.value.fields == ("gpu_name",)


@pytest.mark.parametrize("installed", ["10.14.1.48", "10.14.2.0", "10.15.1.29", "10.16.1"])
def test_version_compatible_engine_runs_on_the_same_or_a_newer_minor(installed):
    notes = check_engine_compatible(make_meta(version_compatible=True), installed, "NVIDIA H100 80GB HBM3", "9.0")
    assert (notes == []) == (installed == "10.14.1.48")


@pytest.mark.parametrize("installed, reason", [
    ("10.13.0.35", "older"), ("10.14.1.47", "older"), ("11.0.0", "runs only on TensorRT 10.x"),
    ("9.3.0", "runs only on TensorRT 10.x"),
])
def test_version_compatible_engine_refused_on_another_major_or_an_older_version(installed, reason):
    with pytest.raises(EngineMismatchError, match=reason) as info:
        check_engine_compatible(make_meta(version_compatible=True), installed, "NVIDIA H100 80GB HBM3", "9.0")
    assert info.value.fields == ("tensorrt_version",)
    assert "tensorrt_version" in str(info.value)


def test_version_compatibility_does_not_cross_gpus():
    with pytest.raises(EngineMismatchError) as info:
        check_engine_compatible(make_meta(version_compatible=True), "10.15.0", "NVIDIA L4", "8.9")
    assert info.value.fields == ("compute_capability",)
