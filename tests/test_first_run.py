"""A new user's first run: GGUF files named by relative paths or by their folder, hub aliases that
are not cached, and what a first (uncached) GGUF load prints (issue 13, points 6-9)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from superweight.errors import ModelLoadError, UsageError
from superweight.model import load_model, resolve
from test_cli import assert_one_line_error, invoke

REPO = Path(__file__).resolve().parents[1]


def write_tiny_gguf(path: Path) -> Path:
    """A random two-layer Llama as an F32 GGUF with a byte-level BPE vocabulary: transformers
    dequantizes it in well under a second, so a first (uncached) GGUF load is cheap to test."""
    import gguf
    import numpy as np

    hidden, intermediate, layers = 16, 32, 2
    tokens = ["Ġ", "a", "b", "c", "Ġa", "Ġb", "Ġc", "<s>", "</s>"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_block_count(layers)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 7 + [3, 3])
    writer.add_token_merges(["Ġ a", "Ġ b", "Ġ c"])
    writer.add_bos_token_id(7)
    writer.add_eos_token_id(8)
    rng = np.random.default_rng(0)

    def add(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    add("token_embd.weight", len(tokens), hidden)
    add("output.weight", len(tokens), hidden)
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    for i in range(layers):
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(hidden, dtype=np.float32))
        for projection in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{projection}.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", intermediate, hidden)
        add(f"blk.{i}.ffn_up.weight", intermediate, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, intermediate)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------- point 6


@pytest.mark.parametrize("spelling", ["m.gguf", "./m.gguf"])
def test_relative_gguf_path_loads_on_the_first_uncached_load(tiny_gguf, tmp_path, empty_cache, monkeypatch, spelling):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(tiny_gguf, work / "m.gguf")
    monkeypatch.chdir(work)
    result = invoke("detect", spelling, "-q", "--out", tmp_path / "c.yaml")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.yaml").is_file() and list(empty_cache.rglob("config.json"))


# ----------------------------------------------------------------------------- point 7


def test_a_folder_holding_one_gguf_is_that_gguf(tiny_gguf, tmp_path, empty_cache):
    folder = tmp_path / "ggdir"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "m.gguf")
    source = resolve(str(folder))
    assert (source.kind, source.location) == ("gguf", str(folder / "m.gguf"))
    assert folder in source.protected_dirs  # named as MODEL, the folder is a model directory
    result = invoke("detect", folder, "-q", "--out", tmp_path / "c.yaml")
    assert result.exit_code == 0, result.output
    assert_one_line_error(invoke("detect", folder, "-q", "--out", folder / "c.yaml"), "inside the model directory")


def test_a_folder_holding_several_ggufs_lists_them_and_names_gguf_file(tiny_gguf, tmp_path):
    folder = tmp_path / "ggdir"
    folder.mkdir()
    for name in ("b-Q8_0.gguf", "a-Q4_1.gguf"):
        shutil.copy(tiny_gguf, folder / name)
    with pytest.raises(UsageError, match=r"2 GGUF files \(a-Q4_1.gguf, b-Q8_0.gguf\).*--gguf-file"):
        resolve(str(folder))
    assert resolve(str(folder), gguf_file="b-Q8_0.gguf").location == str(folder / "b-Q8_0.gguf")
    result = invoke("detect", folder, "-q", "--out", tmp_path / "c.yaml")
    assert_one_line_error(result, "a-Q4_1.gguf, b-Q8_0.gguf", "--gguf-file")
    assert result.exit_code == 2 and not (tmp_path / "c.yaml").exists()


def test_a_folder_with_neither_config_nor_gguf_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json and no .gguf file"):
        resolve(str(tmp_path / "empty"))
