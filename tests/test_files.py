"""runtimes.files: cleanup of what dead writers left never touches a folder it did not make (issue 22,
item 7), while its own leftovers are still removed or restored."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtimes.files import clean_leftovers, leftovers, staged_folder

# A process id above Linux's largest (pid_max is at most 2**22): a name carrying it reads as a dead writer's.
DEAD_PID = 2 ** 22 + 1


def user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("mine", encoding="utf-8")
    return path


def test_a_user_folder_with_a_temporary_name_is_never_removed_or_restored(tmp_path):
    staging_like = user_folder(tmp_path / f".out.{DEAD_PID}.0123abcd.tmp")
    old_like = user_folder(tmp_path / f".out.{DEAD_PID}.89abcdef.old")
    assert leftovers(tmp_path) == [] and clean_leftovers(tmp_path, "out") == []
    assert (staging_like / "keep.txt").is_file() and (old_like / "keep.txt").is_file()
    assert not (tmp_path / "out").exists()  # the .old-looking folder was not renamed into place


def test_a_symlink_with_a_temporary_name_is_left_alone(tmp_path):
    target = user_folder(tmp_path / "elsewhere")
    link = tmp_path / f".out.{DEAD_PID}.0123abcd.tmp"
    link.symlink_to(target)
    assert clean_leftovers(tmp_path) == [] and link.is_symlink()


def test_marked_leftovers_are_removed_and_a_marked_old_folder_restored(tmp_path):
    from runtimes.files import LEFTOVER_MARK

    staging = tmp_path / f".out.{DEAD_PID}.0123abcd.tmp"
    (staging / LEFTOVER_MARK).mkdir(parents=True)
    old = tmp_path / f".out.{DEAD_PID}.89abcdef.old"
    (old / LEFTOVER_MARK).mkdir(parents=True)
    (old / "model.onnx").write_bytes(b"the previous export")
    half_file = tmp_path / f".notes.txt.{DEAD_PID}.01234567.tmp"
    half_file.write_bytes(b"half")

    assert clean_leftovers(tmp_path, targets=lambda name: name == "out") == [staging]
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"the previous export"
    assert not (tmp_path / "out" / LEFTOVER_MARK).exists()
    assert half_file.exists()  # not a target the caller writes
    assert clean_leftovers(tmp_path, "notes.txt") == [half_file]


def test_published_folders_carry_no_mark(tmp_path):
    from runtimes.files import LEFTOVER_MARK

    target = tmp_path / "out"
    for content in (b"first", b"second"):  # a new target, then a replaced one
        with staged_folder(target) as staging:
            assert (staging / LEFTOVER_MARK).is_dir()
            (staging / "file.bin").write_bytes(content)
        assert sorted(p.name for p in target.iterdir()) == ["file.bin"]
        assert (target / "file.bin").read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_writers_staging_folder_is_removed(tmp_path):
    with pytest.raises(RuntimeError), staged_folder(tmp_path / "out") as staging:
        dead = staging.rename(staging.with_name(f".out.{DEAD_PID}.0123abcd.tmp"))  # its writer was killed
        staging.mkdir()  # what staged_folder removes on the error below
        raise RuntimeError
    assert clean_leftovers(tmp_path, "out") == [dead] and not dead.exists()
