"""A new user's first hour (issue 13): options that must not silently do something else, outputs
with ordinary file modes, and output that scripts can read."""

import json
import os
import stat

import pytest

from conftest import DATA_DIR
from test_cli import assert_one_line_error, invoke


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def coords_file(tmp_path):
    path = tmp_path / "coords.yaml"
    path.write_text("super_weights:\n  - {layer: 1, row: 3, col: 5}\n")
    return path


# ----------------------------------------------------------------------------- point 11: file modes


def test_library_outputs_get_the_umask_mode(tmp_path):
    from superweight.files import atomic_directory, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_bytes(b"y")
            os.chmod(tmp / "sub" / "f", 0o600)  # as safetensors and mkstemp create files
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.txt") == 0o640
    assert mode(tmp_path / "d") == 0o750 and mode(tmp_path / "d" / "sub") == 0o750
    assert mode(tmp_path / "d" / "sub" / "f") == 0o640


def test_cli_outputs_are_0644_under_umask_022(tiny_llama_dir, coords_file, tmp_path, umask_022):
    result = invoke("detect", tiny_llama_dir, "-q", "--out", tmp_path / "c.yaml", "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    result = invoke("ablate", tiny_llama_dir, "-q", "--coords", coords_file, "--out", tmp_path / "ablated")
    assert result.exit_code == 0, result.output
    result = invoke("eval", tiny_llama_dir, "-q", "--data-dir", DATA_DIR, "--limit", "1", "--max-length", "32",
                    "--output", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    for name in ("c.yaml", "p.png", "r.json", "ablated/model.safetensors", "ablated/superweight_ablation.json"):
        assert mode(tmp_path / name) == 0o644, name
    assert mode(tmp_path / "ablated") == 0o755


# ----------------------------------------------------------------------------- point 12: output paths


def test_an_existing_directory_as_output_file_is_refused_before_the_work(tiny_llama_dir, tmp_path):
    (tmp_path / "existing").mkdir()
    line = assert_one_line_error(invoke("detect", tiny_llama_dir, "-q", "--out", tmp_path / "existing"),
                                 "is a directory")
    assert "IsADirectoryError" not in line
    assert list((tmp_path / "existing").iterdir()) == [] and not list(tmp_path.glob(".*"))


def test_a_missing_output_folder_is_refused_not_created(tiny_llama_dir, tmp_path):
    target = tmp_path / "no" / "such" / "x.yaml"
    assert_one_line_error(invoke("detect", tiny_llama_dir, "-q", "--out", target), "does not exist", "mkdir -p")
    assert not (tmp_path / "no").exists()
    assert_one_line_error(invoke("ablate", tiny_llama_dir, "-q", "--coord", "1,3,5", "--out",
                                 tmp_path / "no" / "model"), "does not exist")
    assert not (tmp_path / "no").exists()
