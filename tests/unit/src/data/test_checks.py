"""Input checks shared by the worker and the launcher."""

import os

import pytest

from src.data.checks import output_dir_problems, writable_problems


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; the check cannot fail as root")
def test_unwritable_output_dir_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    (problem,) = writable_problems(locked / "run", "--output-dir")
    assert problem.startswith(f"--output-dir {locked / 'run'}: not writable")


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    (problem,) = output_dir_problems(target)
    assert "exists and is not empty" in problem
    assert writable_problems(target / "sub", "--output-dir")  # a file cannot hold a directory


def test_resume_needs_an_earlier_run(tmp_path):
    (problem,) = output_dir_problems(tmp_path, resume=True)
    assert "holds no earlier run" in problem
    (tmp_path / "status.json").write_text("{}")
    assert output_dir_problems(tmp_path, resume=True) == []
