"""One error hierarchy, one exit-code mapping for every CLI: each DeweyError kind, raised inside
``dewey-export``, ``dewey-embed`` and ``dewey-train``, ends the command with its documented exit code
and one line, never a traceback."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from runtimes.errors import (
    EXIT_BAD_INPUT,
    EXIT_PARTIAL,
    EXIT_VERIFICATION_FAILED,
    BadInputError,
    DeweyError,
    ExportError,
    MissingDependencyError,
    ModelFileError,
    PartialFailure,
    VerificationFailed,
    exit_code_for,
)

ERRORS = {
    BadInputError: EXIT_BAD_INPUT,
    ModelFileError: EXIT_BAD_INPUT,
    MissingDependencyError: EXIT_BAD_INPUT,
    ExportError: EXIT_BAD_INPUT,
    VerificationFailed: EXIT_VERIFICATION_FAILED,
    PartialFailure: EXIT_PARTIAL,
}


def _export(monkeypatch, checkpoint, tmp_path, error):
    pytest.importorskip("onnx")
    import dewey_export.pipeline
    from dewey_export.cli import main

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(dewey_export.pipeline, "export", fail)
    return main, ["onnx", "--model", str(checkpoint), "--out", str(tmp_path / "out")]


def _embed(monkeypatch, checkpoint, tmp_path, error):
    pytest.importorskip("pyarrow")
    import dewey_embed.inputs
    from dewey_embed.cli import main

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(dewey_embed.inputs, "list_files", fail)
    return main, [str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(checkpoint)]


def _train(monkeypatch, checkpoint, tmp_path, error):
    import runtimes.corpus
    from dewey_train.cli import main

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(runtimes.corpus, "split_documents", fail)
    return main, ["corpus"]


@pytest.mark.parametrize("error_class", ERRORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cli", [_export, _embed, _train], ids=["dewey-export", "dewey-embed", "dewey-train"])
def test_every_error_kind_exits_with_its_code_in_one_line(cli, error_class, monkeypatch, checkpoint, tmp_path):
    message = f"the {error_class.__name__} of this test"
    command, args = cli(monkeypatch, checkpoint, tmp_path, error_class(f"{message}\nsecond line"))
    result = CliRunner().invoke(command, args)
    assert result.exit_code == ERRORS[error_class], result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.strip().splitlines() if message in line]
    assert len(lines) == 1 and "second line" in lines[0], result.output


def test_exit_code_for_knows_user_errors_only():
    assert all(exit_code_for(cls("x")) == code for cls, code in ERRORS.items())
    assert exit_code_for(FileNotFoundError("x")) == EXIT_BAD_INPUT
    assert issubclass(ModelFileError, ValueError) and issubclass(MissingDependencyError, ImportError)
    assert all(issubclass(cls, DeweyError) for cls in ERRORS)
    with pytest.raises(ValueError, match="KeyError"):
        exit_code_for(KeyError("a bug"))


def test_names_the_tests_import_stay_importable():
    from dewey_export.cli import EXIT_BAD_INPUT as export_bad_input
    from runtimes.config import ModelFileError as config_model_file_error
    from runtimes.export_format import ExportFilesChanged
    from runtimes.trt_plan import EngineMismatchError

    assert config_model_file_error is ModelFileError and export_bad_input == EXIT_BAD_INPUT
    assert issubclass(ExportFilesChanged, ModelFileError) and issubclass(EngineMismatchError, ModelFileError)
