import os

import pytest

from magicseg_engine.atomic import atomic_output, atomic_write_text, check_writable_dir
from magicseg_engine.errors import UsageError


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as f:
            f.write("half of the new")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["data.txt"]


def test_success_replaces_the_file(tmp_path):
    target = tmp_path / "sub" / "data.txt"
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory_is_a_usage_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(UsageError, match="not writable"):
        check_writable_dir(ro)


def test_path_under_a_file_is_a_usage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot create output directory"):
        check_writable_dir(blocker / "sub")
