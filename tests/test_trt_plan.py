"""TensorRT planning without TensorRT: profiles from length buckets, engine metadata and the
compatibility check (runtimes.trt_plan), precision names (runtimes.precision), the builder's precision
plan and version floor (dewey_export.trt_precision, trt_build.tensorrt_status and the CLI), ONNX
Runtime's TensorRT provider options, and the device the TensorRT backend makes its objects on.

No GPU and no ``tensorrt`` here: the installed TensorRT is a stand-in module with a version string, and
the backend's GPUs are stand-ins that record which device was current when each object was made.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import numpy as np
import pytest

from dewey_export import trt_build
from dewey_export.trt_precision import PrecisionPlan, precision_plan, tensorrt_version_problem
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

# Versions whose ONNX parser imports Attention (10.14) and RotaryEmbedding (10.15.1), and older ones.
SUPPORTED = ["10.15.1", "10.15.1.29", "10.16.1", "11.0.0.post1", "11.3.0", "11.4.1.2"]
TOO_OLD = ["10.14.1.48", "10.15.0", "10.0.0b6", "9.3.0.post12.dev1", "8.6.1"]
# The weak typing BuilderFlags: deprecated in TensorRT 10.12, removed in 11.x.
WEAK_TYPING_FLAGS = {"FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"}


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_every_supported_tensorrt_builds_strongly_typed_from_the_graph_precision(version, precision):
    plan = precision_plan(precision, version)
    assert plan == PrecisionPlan(precision, ("STRONGLY_TYPED",), ())
    assert not WEAK_TYPING_FLAGS & set(plan.network_flags + plan.cleared_builder_flags)


def test_a_plan_has_no_flags_to_set_and_no_layers_to_pin():
    """The fields a weakly typed build needed (builder flags to set, layer kinds pinned to fp32) are gone:
    nothing left could pin a layer, integer ones included."""
    assert {field.name for field in dataclasses.fields(PrecisionPlan)} == {
        "precision", "network_flags", "cleared_builder_flags"}


@pytest.mark.parametrize("version", SUPPORTED)
def test_fp32_is_strongly_typed_without_tf32(version):
    assert precision_plan("fp32", version) == PrecisionPlan("fp32", ("STRONGLY_TYPED",), ("TF32",))


@pytest.mark.parametrize("version", TOO_OLD)
def test_tensorrt_older_than_10_15_1_refused_naming_both_versions(version):
    with pytest.raises(ValueError) as info:
        precision_plan("fp16", version)
    assert f"TensorRT {version} is installed" in str(info.value) and ">= 10.15.1" in str(info.value)
    assert tensorrt_version_problem(version) == str(info.value)


@pytest.mark.parametrize("version", SUPPORTED)
def test_supported_versions_have_no_problem(version):
    assert tensorrt_version_problem(version) is None


@pytest.mark.parametrize("version", ["", "ten", "10", "10.x", "v10.1.0", "10.1.0-garbage", None, 10.1])
def test_unreadable_versions_rejected(version):
    with pytest.raises(ValueError, match="cannot read the TensorRT version"):
        precision_plan("fp16", version)


@pytest.mark.parametrize("precision", ["int8", "FP16", "", None])
def test_unknown_precision_rejected(precision):
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, bf16"):
        precision_plan(precision, "10.15.1.29")


def test_precision_plan_takes_any_spelling():
    assert precision_plan("bfloat16", "11.3.0") == precision_plan("bf16", "11.3.0")


def fake_tensorrt(version: str, builders: list):
    """A stand-in for the tensorrt module with ``version``; ``builders`` collects each Builder made."""
    class Logger:
        ERROR = WARNING = 0

        def __init__(self, level):
            pass

    return types.SimpleNamespace(__version__=version, Logger=Logger, Builder=builders.append)


@pytest.mark.parametrize("version", TOO_OLD[:2])
def test_tensorrt_status_refuses_an_old_tensorrt_before_touching_the_gpu(monkeypatch, version):
    builders = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, builders))
    status = trt_build.tensorrt_status()
    assert status and f"TensorRT {version} is installed" in status and ">= 10.15.1" in status
    assert builders == []  # refused by its version, before a Builder (which needs a GPU) is made


@pytest.mark.parametrize("version", ["10.15.1", "10.15.1.29", "11.3.0"])
def test_tensorrt_status_accepts_10_15_1_and_11(monkeypatch, version):
    builders = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, builders))
    assert trt_build.tensorrt_status() is None and len(builders) == 1


def test_tensorrt_status_says_when_the_version_cannot_be_read(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("unknown", []))
    assert "cannot tell which TensorRT is installed" in trt_build.tensorrt_status()


def test_cli_refuses_an_old_tensorrt_with_exit_2_before_exporting(monkeypatch, checkpoint, tmp_path):
    pytest.importorskip("click")
    from click.testing import CliRunner

    from dewey_export.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.14.1.48", []))
    out = tmp_path / "engine"
    result = CliRunner().invoke(main, ["trt", "--model", str(checkpoint), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "TensorRT 10.14.1.48 is installed" in result.output and ">= 10.15.1" in result.output
    assert list(tmp_path.iterdir()) == []


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
    with pytest.raises(ValueError, match="dewey-export trt --model CHECKPOINT --out DIR"):
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


# ----------------------------------------------------------------------------------------------------
# ONNX Runtime's TensorRT provider
# ----------------------------------------------------------------------------------------------------


def test_tensorrt_provider_options_hold_one_profile_per_session(tmp_path):
    from runtimes.backends.onnx_backend import providers_for, tensorrt_provider_options

    profiles = plan_profiles([(512, 8), (4096, 1)], max_position_embeddings=4096)
    options = tensorrt_provider_options(profiles[1], engine_cache_path=tmp_path)
    for key, which in (("trt_profile_min_shapes", 0), ("trt_profile_opt_shapes", 1), ("trt_profile_max_shapes", 2)):
        entries = options[key].split(",")
        assert sorted(entry.split(":")[0] for entry in entries) == sorted(INPUTS)  # each input once: one profile
        assert entries[0] == "input_ids:" + "x".join(map(str, profiles[1].shapes()["input_ids"][which]))
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == str(tmp_path)
    provider, provider_options = providers_for("tensorrt:1", options)[0]
    assert provider == "TensorrtExecutionProvider" and provider_options["device_id"] == 1
    assert providers_for("tensorrt")[1][0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("several", [lambda p: p, lambda p: tuple(p[:1])])
def test_tensorrt_provider_options_refuse_a_list_of_profiles(several):
    from runtimes.backends.onnx_backend import tensorrt_provider_options

    with pytest.raises(ValueError, match="one session per length bucket"):
        tensorrt_provider_options(several(plan_profiles([(512, 8), (4096, 1)], 4096)))


def test_tensorrt_provider_options_leave_fp16_off_for_the_strongly_typed_fp16_graph():
    """With trt_fp16_enable the provider builds weakly typed; off, it builds the fp16 graph as typed."""
    from runtimes.backends.onnx_backend import tensorrt_provider_options

    assert tensorrt_provider_options() == {"trt_fp16_enable": False}
    assert tensorrt_provider_options(plan_profiles([(512, 8)], 4096)[0])["trt_fp16_enable"] is False
    assert tensorrt_provider_options(fp16=True)["trt_fp16_enable"] is True


# ----------------------------------------------------------------------------------------------------
# The TensorRT backend's device
# ----------------------------------------------------------------------------------------------------


class _DeviceRecorder:
    """Stand-ins for torch.cuda.device / torch.cuda.Stream and the tensorrt runtime objects: each records
    the CUDA device that was current when it was made."""

    def __init__(self):
        self.current, self.made = "cuda:0", {}

    def device(self, device):
        recorder = self

        class Switch:
            def __enter__(self):
                self.previous, recorder.current = recorder.current, str(device)

            def __exit__(self, *exc):
                recorder.current = self.previous

        return Switch()

    def record(self, name, value=None):
        self.made[name] = self.current
        return value

    def tensorrt(self, version: str):
        recorder = self

        class Engine:
            num_optimization_profiles = 1

            def create_execution_context(self):
                return recorder.record("context", object())

            def get_tensor_shape(self, name):
                return (1, 48)

        class Runtime:
            def __init__(self, logger):
                recorder.record("runtime")

            def deserialize_cuda_engine(self, data):
                return recorder.record("engine", Engine())

        class Logger:
            WARNING = 0

            def __init__(self, level):
                pass

        return types.SimpleNamespace(__version__=version, Logger=Logger, Runtime=Runtime)


@pytest.fixture
def fake_gpus(monkeypatch):
    """Two stand-in GPUs named 'Stand-in GPU' with compute capability 9.0; cuda:0 is current."""
    torch = pytest.importorskip("torch")
    recorder = _DeviceRecorder()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: types.SimpleNamespace(name="Stand-in GPU", major=9, minor=0))
    monkeypatch.setattr(torch.cuda, "device", recorder.device)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: recorder.record("stream"))
    monkeypatch.setitem(sys.modules, "tensorrt", recorder.tensorrt("10.15.1.29"))
    return recorder


def _engine_folder(folder, gpu_name="Stand-in GPU"):
    make_meta(tensorrt_version="10.15.1.29", gpu_name=gpu_name,
              profiles=plan_profiles([(512, 8)], MAX_POSITIONS)).write(folder)
    (folder / ENGINE_FILE).write_bytes(b"serialized engine")
    return folder


def test_trt_backend_makes_runtime_engine_context_and_stream_on_its_own_device(fake_gpus, tmp_path):
    from runtimes.backends.trt_backend import TensorRTBackend

    backend = TensorRTBackend(_engine_folder(tmp_path), device="cuda:1")
    assert fake_gpus.made == {name: "cuda:1" for name in ("runtime", "engine", "context", "stream")}
    assert fake_gpus.current == "cuda:0" and backend.notes == []


def test_trt_backend_warns_when_the_engine_was_built_on_another_gpu_of_its_architecture(fake_gpus, tmp_path):
    from runtimes.backends.trt_backend import TensorRTBackend

    with pytest.warns(RuntimeWarning, match="timed on the other GPU"):
        backend = TensorRTBackend(_engine_folder(tmp_path, gpu_name="Other GPU"), device="cuda:0")
    assert len(backend.notes) == 1
