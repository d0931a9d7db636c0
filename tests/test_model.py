"""Resolving MODEL (alias, GGUF, directory, hub id) and loading local models offline."""

from pathlib import Path

import pytest
import torch

from superweight.errors import ModelLoadError, UsageError
from superweight.model.load import load_model
from superweight.model.source import resolve


def test_default_model_is_the_packaged_smollm2():
    source = resolve(None)
    assert source.alias == "smollm2-135m" and source.kind == "gguf"
    assert source.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and Path(source.location).is_file()
    assert source.known_key == "smollm2-135m"
    assert Path(source.location).parent in source.protected_dirs  # never write into the package


def test_paper_aliases_point_at_the_hub():
    expected = {"llama-7b": "huggyllama/llama-7b", "mistral-7b": "mistralai/Mistral-7B-v0.1",
                "llama-13b": "huggyllama/llama-13b", "llama-30b": "huggyllama/llama-30b",
                "llama3-8b": "meta-llama/Meta-Llama-3-8B", "olmo-1b": "allenai/OLMo-1B-0724-hf",
                "olmo-7b": "allenai/OLMo-7B-0724-hf", "phi3-mini": "microsoft/Phi-3-mini-4k-instruct"}
    for alias, hub_id in expected.items():
        source = resolve(alias)
        assert (source.kind, source.location, source.known_key) == ("hub", hub_id, alias)


def test_a_hub_model_in_a_custom_cache_dir_protects_its_folder_there(tmp_path):
    from superweight.errors import OutputPathError
    from superweight.files import refuse_inside

    source = resolve("org/tiny", cache_dir=str(tmp_path))
    folder = tmp_path / "models--org--tiny"
    assert folder in source.protected_dirs
    for target in (folder / "snapshots" / "abc" / "ablated", folder):
        with pytest.raises(OutputPathError):
            refuse_inside(target, source.protected_dirs)
    refuse_inside(tmp_path / "superweight" / "offload", source.protected_dirs)  # our own cache stays usable


def test_kinds(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert resolve(str(gguf)).kind == "gguf"
    assert resolve(str(tmp_path), gguf_file="m.gguf").location == str(gguf)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert resolve(str(tmp_path / "model")).kind == "local"
    assert resolve("org/name", revision="abc").revision == "abc"
    with pytest.raises(ModelLoadError, match="not found"):
        resolve(str(tmp_path), gguf_file="other.gguf")


def test_local_directory_loads_with_dtype(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    assert loaded.model.dtype == torch.bfloat16 and loaded.dtype == "bfloat16"
    assert loaded.source.kind == "local" and not loaded.model.training
    assert loaded.tokenizer("Apple Inc. is").input_ids


def test_bad_dtype_and_device(tiny_llama_dir):
    with pytest.raises(UsageError, match="--dtype"):
        load_model(str(tiny_llama_dir), dtype="float8")
    with pytest.raises(UsageError, match="--device"):
        load_model(str(tiny_llama_dir), device="tpu")


def test_device_map_and_max_memory_parsing(tmp_path):
    from superweight.model.devices import parse_device_map, parse_max_memory

    assert parse_device_map("balanced") == "balanced"
    assert parse_device_map('{"model.layers": 0, "lm_head": "cpu"}') == {"model.layers": 0, "lm_head": "cpu"}
    path = tmp_path / "map.json"
    path.write_text('{"": "cpu"}')
    assert parse_device_map(str(path)) == {"": "cpu"}
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GB") == {0: "20GiB", 1: "20GiB", "cpu": "64GB"}
    for bad in ("20GiB", "gpu0=20GiB", "0=lots", "0=20GiB,,"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_max_memory(bad)
    with pytest.raises(UsageError, match="--device-map"):
        parse_device_map("everywhere")
    path.write_bytes(b"\xff\xfe{")  # a .json file that is not UTF-8: the same usage error, not UnicodeDecodeError
    with pytest.raises(UsageError, match="bad --device-map"):
        parse_device_map(str(path))


def test_cli_malformed_max_memory_is_one_line(tiny_llama_dir, tmp_path):
    from test_cli import assert_one_line_error, invoke

    assert_one_line_error(invoke("detect", tiny_llama_dir, "-q", "--out", tmp_path / "c.yaml", "--max-memory", "0=lots"),
                          "--max-memory")


def test_explicit_device_map_detects_like_a_plain_load(tiny_llama_dir, tmp_path):
    """accelerate places the model (here all on CPU through a device map); detection is unchanged."""
    from superweight.find.detect import detect

    ids = torch.tensor([[1, 3, 4, 5, 6]])
    plain = load_model(str(tiny_llama_dir), device="cpu")
    mapped = load_model(str(tiny_llama_dir), device_map={"": "cpu"})
    a, b = detect(plain.model, ids, iterations=1), detect(mapped.model, ids, iterations=1)
    assert [s.spike for s in a.iterations[0]] == pytest.approx([s.spike for s in b.iterations[0]])


@pytest.mark.parametrize("variable,value,offline", [("HF_HUB_OFFLINE", "1", True), ("HF_HUB_OFFLINE", "on", True),
                                                    ("TRANSFORMERS_OFFLINE", "yes", True),
                                                    ("HF_HUB_OFFLINE", "0", False), (None, None, False)])
def test_one_offline_check_for_models_and_task_data(monkeypatch, variable, value, offline):
    """The environment as it is now counts (a notebook may set it after huggingface_hub was
    imported), and so does huggingface_hub's own state; task data asks the same question."""
    from huggingface_hub import constants

    import superweight.measure.tasks as tasks
    from superweight.model.hub import hub_offline

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if variable:
        monkeypatch.setenv(variable, value)
    assert hub_offline() is offline
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub was imported offline
    assert hub_offline() is True
    assert tasks.hub_offline is hub_offline


def test_every_config_is_read_by_one_reader_that_refuses_a_non_causal_model(tmp_path):
    from transformers import ViTConfig

    from superweight.model.hub import read_config
    from superweight.model.source import resolve

    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        read_config(resolve(str(tmp_path)), tmp_path, {})
    with pytest.raises(ModelLoadError, match="cannot load"):
        read_config(resolve(str(tmp_path)), tmp_path / "missing", {})


def test_a_library_load_prints_nothing_unless_asked(tiny_llama_dir, capfd):
    """transformers' "Loading weights: 100%|..." bar and its log lines stay off stderr when no
    progress callback is given; with one, transformers' own settings are left alone."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    try:
        capfd.readouterr()
        load_model(str(tiny_llama_dir), dtype="float32")
        captured = capfd.readouterr()
        assert captured.err == "" and captured.out == ""
        assert logging.is_progress_bar_enabled()  # restored after the load
        load_model(str(tiny_llama_dir), dtype="float32", progress=lambda message: None)
        assert "Loading weights" in capfd.readouterr().err
    finally:
        if not was_enabled:
            logging.disable_progress_bar()
