"""Coordinate files: round trip in YAML and JSON, and one-line errors for malformed input."""

import pytest

from superweight.coords import SuperWeight, parse_coord, read_coords, write_coords
from superweight.errors import CoordinatesError

WEIGHTS = [SuperWeight(11, 507, 1229, value=5.87, output_spike=24021.9, token=0, iteration=0),
           SuperWeight(3, 1, 2, expert=4, iteration=1),
           SuperWeight(3, 1, 2, expert="shared", iteration=1)]  # a mixture-of-experts layer's shared expert


@pytest.mark.parametrize("name", ["c.yaml", "c.yml", "c.json"])
def test_round_trip(tmp_path, name):
    path = write_coords(tmp_path / name, WEIGHTS, model="m", model_type="llama")
    weights, meta = read_coords(path)
    assert weights == WEIGHTS
    assert meta == {"model": "m", "model_type": "llama"}
    assert not list(tmp_path.glob(".*"))  # no temp file left behind


def test_minimal_file_and_bare_list(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- {layer: 2, row: 3968, col: 7003}\n")
    assert read_coords(path)[0] == [SuperWeight(2, 3968, 7003)]


@pytest.mark.parametrize("text,fragment", [
    ("super_weights: [ {layer: 1", "not valid YAML"),
    ("just a string", "super_weights"),
    ("super_weights: [{layer: 1, row: 2}]", "missing key(s) col"),
    ("super_weights: [{layer: one, row: 2, col: 3}]", "'layer' must be a non-negative integer"),
    ("super_weights: [{layer: -1, row: 2, col: 3}]", "'layer' must be a non-negative integer"),
    ("super_weights: [{layer: 1, row: 2.5, col: 3}]", "'row' must be a non-negative integer"),
    ("super_weights: [{layer: 1, row: 2, col: 3, value: big}]", "'value' must be a finite number"),
    ("super_weights: [{layer: 1, row: 2, col: 3, output_spike: .inf}]", "'output_spike' must be a finite number"),
    ("super_weights: [[1, 2, 3]]", "expected a mapping"),
    ("super_weights: [{layer: 1, row: 2, col: 3, expert: common}]",
     "'expert' must be a non-negative integer or 'shared'"),
])
def test_malformed_files(tmp_path, text, fragment):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(CoordinatesError) as error:
        read_coords(path)
    assert fragment in str(error.value)
    assert "\n" not in str(error.value)


def test_binary_file_is_a_coordinates_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00layer")
    with pytest.raises(CoordinatesError, match="not a text file"):
        read_coords(path)


def test_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(CoordinatesError, match="not valid JSON"):
        read_coords(path)
    with pytest.raises(CoordinatesError, match="not found"):
        read_coords(tmp_path / "none.yaml")


def test_parse_coord():
    assert parse_coord("11,507,1229") == SuperWeight(11, 507, 1229)
    assert parse_coord(" 1, 2, 3, 4") == SuperWeight(1, 2, 3, expert=4)
    assert parse_coord("1,2,3,shared") == SuperWeight(1, 2, 3, expert="shared")
    for bad in ("1,2", "a,b,c", "1,2,-3", "1,2,3,4,5", "1,2,3,other", "1,2,shared"):
        with pytest.raises(CoordinatesError, match="LAYER,ROW,COL"):
            parse_coord(bad)
