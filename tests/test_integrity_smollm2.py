"""A damaged or incomplete SmolLM2 checkpoint is refused, never measured (issue #20, points 4 and 8).

Each case is built from the real SmolLM2 files of the dequantized GGUF cache (float32 safetensors):
a copy loses layer 11's nine tensors (what a lost shard gives), gets a config.json that says 40
layers, a truncated weight file, or a NaN in a down projection. The cache entry itself, damaged,
is rebuilt with a notice.
"""

import json
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import DATA_DIR
from test_cli import assert_one_line_error, invoke

from superweight.errors import ModelLoadError
from superweight.model.gguf import dequantized_gguf
from superweight.model.integrity import MANIFEST, manifest_problem
from superweight.model.load import load_model
from superweight.model.source import resolve

pytestmark = pytest.mark.integration
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def _quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def smollm2_dir(gguf_cache) -> Path:
    """SmolLM2's float32 safetensors folder in the test cache (written there by its first load)."""
    return dequantized_gguf(resolve("smollm2-135m"), "auto", None, _quiet, _quiet)[0]


def _folder(smollm2_dir: Path, target: Path, weights: str = "link") -> Path:
    """A model folder with SmolLM2's config and tokenizer; its weights a link to the real file
    ('link'), a copy ('copy'), or none ('none')."""
    target.mkdir()
    for name in SIDE_FILES:
        shutil.copyfile(smollm2_dir / name, target / name)
    if weights == "link":
        (target / "model.safetensors").symlink_to(smollm2_dir / "model.safetensors")
    elif weights == "copy":
        shutil.copyfile(smollm2_dir / "model.safetensors", target / "model.safetensors")
    return target


@pytest.fixture(scope="module")
def without_layer_11(smollm2_dir, tmp_path_factory) -> Path:
    folder = _folder(smollm2_dir, tmp_path_factory.mktemp("no-layer-11") / "smollm2", weights="none")
    weights = load_file(smollm2_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.11.")},
              folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_checkpoint_without_layer_11_is_refused_by_every_command(without_layer_11, tmp_path):
    coords = tmp_path / "coords.yaml"
    expected = "9 tensors the model needs are not in its weight files (model.layers.11.*)"
    assert_one_line_error(invoke("detect", without_layer_11, "--out", coords), expected)
    assert_one_line_error(invoke("detect", without_layer_11, "--stream", "--out", coords), expected)
    assert not coords.exists()
    out = tmp_path / "ablated"
    assert_one_line_error(invoke("ablate", without_layer_11, "--coord", "2,507,90", "--out", out), expected)
    assert not out.exists()
    assert_one_line_error(invoke("eval", without_layer_11, "--task", "wikitext", "--limit", "1",
                                 "--data-dir", DATA_DIR), expected)


def test_a_config_that_says_40_layers_is_refused(smollm2_dir, tmp_path):
    folder = _folder(smollm2_dir, tmp_path / "forty")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 40}))
    with pytest.raises(ModelLoadError, match=r"90 tensors the model needs .*\(model\.layers\.\{30\.\.39\}\.\*\)"):
        load_model(str(folder), device="cpu")


def test_a_truncated_weight_file_is_named(smollm2_dir, tmp_path):
    folder = _folder(smollm2_dir, tmp_path / "truncated", weights="none")
    with open(smollm2_dir / "model.safetensors", "rb") as source:
        (folder / "model.safetensors").write_bytes(source.read(50_000_000))
    coords = tmp_path / "coords.yaml"
    line = assert_one_line_error(invoke("detect", folder, "--out", coords),
                                 f"weight file {folder / 'model.safetensors'} is damaged (truncated: 50000000 of")
    assert "SafetensorError" not in line and not coords.exists()
    assert_one_line_error(invoke("detect", folder, "--stream"), f"{folder / 'model.safetensors'} is damaged")


def test_a_nan_in_a_down_projection_is_refused_by_name(smollm2_dir, tmp_path):
    folder = _folder(smollm2_dir, tmp_path / "nan", weights="copy")
    path = folder / "model.safetensors"
    with open(path, "r+b") as f:
        length = struct.unpack("<Q", f.read(8))[0]
        entry = json.loads(f.read(length))["model.layers.11.mlp.down_proj.weight"]
        columns = entry["shape"][1]
        f.seek(8 + length + entry["data_offsets"][0] + 4 * (507 * columns + 1229))  # float32: 4 bytes
        f.write(struct.pack("<f", float("nan")))
    with pytest.raises(ModelLoadError, match=r"^model\.layers\.11\.mlp\.down_proj\.weight holds 1 NaN or infinite"):
        load_model(str(folder), device="cpu")


def test_a_damaged_gguf_cache_entry_is_rebuilt_with_a_notice(smollm2_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(cache))
    entry = cache / "gguf" / smollm2_dir.name
    entry.parent.mkdir(parents=True)
    _folder(smollm2_dir, entry, weights="none")
    for name in ("chat_template.jinja",):
        if (smollm2_dir / name).is_file():
            shutil.copyfile(smollm2_dir / name, entry / name)
    with open(smollm2_dir / "model.safetensors", "rb") as source:
        (entry / "model.safetensors").write_bytes(source.read(1_000_000))
    assert manifest_problem(entry).startswith("model.safetensors truncated")
    notices: list[str] = []
    loaded = load_model("smollm2-135m", device="cpu", notice=notices.append)
    assert not loaded.from_cache
    assert any(f"the cached copy of SmolLM2-135M-Instruct.Q4_1.gguf in {entry} is damaged "
               "(model.safetensors truncated" in n and n.endswith("rebuilding it") for n in notices), notices
    assert (entry / MANIFEST).is_file() and manifest_problem(entry) is None
    assert (entry / "model.safetensors").stat().st_size == (smollm2_dir / "model.safetensors").stat().st_size
    # the rebuilt entry is used as it is from now on
    assert load_model("smollm2-135m", device="cpu").from_cache


def test_a_cache_that_cannot_be_written_is_named_before_the_dequantization(tmp_path, monkeypatch, tiny_llama_dir):
    """SUPERWEIGHT_CACHE naming a file (or a place no one can write) gave, after the GGUF had been
    dequantized, 'NotADirectoryError: [Errno 20] Not a directory: '.../gguf''; a device map's disk
    offload folder the same."""
    from transformers import AutoModelForCausalLM

    from superweight.errors import OutputPathError

    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "a-file"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("dequantized"))
    with pytest.raises(OutputPathError, match=rf"^cannot write the cache folder {tmp_path / 'a-file' / 'gguf'} "
                                              r"\(Not a directory\); point SUPERWEIGHT_CACHE"):
        load_model("smollm2-135m", device="cpu")
    with pytest.raises(OutputPathError, match=rf"^cannot write the cache folder {tmp_path / 'a-file' / 'offload'} "):
        load_model(str(tiny_llama_dir), device_map="auto")
