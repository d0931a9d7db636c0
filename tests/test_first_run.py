"""A new user's first run: GGUF files named by relative paths or by their folder, hub aliases that
are not cached, and what a first (uncached) GGUF load prints (issue 13, points 6-9)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from superweight.errors import ModelLoadError, UsageError
from superweight.model.load import load_model
from superweight.model.source import resolve
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


# ----------------------------------------------------------------------------- point 8


def test_an_alias_not_in_the_cache_offline_names_its_hub_id():
    line = assert_one_line_error(invoke("detect", "mistral-7b", "-q"),
                                 "alias 'mistral-7b' maps to the hub model mistralai/Mistral-7B-v0.1",
                                 "not in the local cache", "HF_HUB_OFFLINE")
    assert "not a known alias" not in line


def closed_local_port() -> int:
    """A 127.0.0.1 port nothing listens on: connections to it are refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sw(*args, env: dict, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """`sw` in a fresh process: the hub's settings (endpoint, offline mode) and tqdm's are read at import."""
    command = [sys.executable, "-c", "from superweight.cli import main; main()", *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def sw_env(tmp_path: Path, **extra: str) -> dict:
    """No HF_HUB_OFFLINE, and a hub endpoint on a closed 127.0.0.1 port: "no network" without any
    request leaving this machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_local_port()}", HF_HOME=str(tmp_path / "hf"),
               SUPERWEIGHT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO / "src"), **extra)
    env.pop("HTTP_PROXY", None), env.pop("HTTPS_PROXY", None), env.pop("http_proxy", None), env.pop("https_proxy", None)
    return env


def test_no_network_without_hf_hub_offline_fails_fast_in_one_line(tmp_path):
    result = run_sw("detect", "mistral-7b", "--out", tmp_path / "c.yaml", env=sw_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    # Piped, progress prints plain stage lines ("loading ..."); the error is one line, and no
    # "Retrying in 1s [Retry 1/5]" line comes before it.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("loading ")]
    assert len(lines) == 1 and "Retry" not in result.stderr, result.stderr
    assert lines[0].startswith("error: cannot reach http://127.0.0.1:")
    for fragment in ("mistralai/Mistral-7B-v0.1 (alias 'mistral-7b')", "not in the local cache", "HF_HUB_OFFLINE=1",
                     "local directory"):
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "c.yaml").exists()


def test_no_network_without_hf_hub_offline_uses_a_cached_hub_model(tiny_llama_dir, tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = run_sw("detect", "org/tiny", "--out", tmp_path / "c.yaml", "--json", env=sw_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not reachable: using the cached copy of org/tiny" in result.stderr
    assert "Retry" not in result.stderr and (tmp_path / "c.yaml").is_file()


# ----------------------------------------------------------------------------- point 9


def test_first_gguf_load_says_so_and_no_library_bar_shows(tiny_gguf, tmp_path):
    env = sw_env(tmp_path, HF_HUB_OFFLINE="1")
    env.pop("TQDM_DISABLE", None)
    result = run_sw("detect", tiny_gguf, "--out", tmp_path / "c.yaml", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "first load of tiny.gguf: dequantizing (llama) and caching it, once" in result.stderr
    assert "Converting" not in result.stderr and "it/s" not in result.stderr, result.stderr  # transformers' tqdm bar

    # a narrow terminal does not cut a message line in two (it names a path: grep must find it whole)
    again = run_sw("detect", tiny_gguf, "--out", tmp_path / "c.yaml", "--force", env={**env, "COLUMNS": "40"},
                   cwd=tmp_path)
    assert again.returncode == 0 and "first load" not in again.stderr
    assert f"loaded {tiny_gguf} (float32) in" in again.stderr and "from the GGUF cache\n" in again.stderr


def test_first_gguf_load_under_quiet_prints_nothing_on_stderr(tiny_gguf, tmp_path):
    env = sw_env(tmp_path, HF_HUB_OFFLINE="1")
    env.pop("TQDM_DISABLE", None)
    result = run_sw("detect", tiny_gguf, "-q", "--out", tmp_path / "c.yaml", env=env, cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@pytest.mark.parametrize("coord,fragment", [("2,3,4", "layer 2"), ("1,16,4", "row 16"), ("1,3,32", "col 32"),
                                            ("1,3,4,0", "no experts")])
def test_gguf_coordinates_out_of_range_fail_before_the_load(tiny_gguf, tmp_path, monkeypatch, coord, fragment):
    """A GGUF's sizes come from its header: an out-of-range --coord fails before any dequantisation."""
    import superweight.model.load as model_module
    from typer.testing import CliRunner

    from superweight.model.gguf import gguf_dense_shape

    from superweight.cli import app

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(model_module, "load_model", no_load)
    result = CliRunner().invoke(app, ["ablate", str(tiny_gguf), "-q", "--coord", coord, "--out", str(tmp_path / "x")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error: coordinate") and fragment in result.output
    assert not (tmp_path / "x").exists()
    assert gguf_dense_shape(str(tiny_gguf)) == (2, 16, 32)


def test_a_local_directory_loads_without_the_hub_check(tiny_llama_dir, monkeypatch):
    """No network and no HF_HUB_OFFLINE: a local model directory never asks the hub (it was taken for
    a hub id: HFValidationError)."""
    import superweight.model.hub as hub

    monkeypatch.setattr(hub, "hub_offline", lambda: False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    assert loaded.model.config.model_type == "llama"


# ----------------------------------------------------------------------------- typos of an alias (issue 21, point 7)


def test_a_typo_of_an_alias_is_named_as_one():
    with pytest.raises(ModelLoadError) as error:
        resolve("smollm2-135")
    message = str(error.value)
    assert "did you mean smollm2-135m?" in message
    for what in ("alias", "local path", "hub id"):
        assert what in message
    assert resolve("gpt2").kind == "hub" and resolve("org/smollm2-135").kind == "hub"  # real hub ids stay hub ids


def test_no_network_and_a_name_that_is_not_an_alias_says_all_it_is_not(tmp_path):
    result = run_sw("detect", "org/tiny-model", "--out", tmp_path / "c.yaml", env=sw_env(tmp_path), cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("loading ")]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    for fragment in ("'org/tiny-model' is not a model alias or a local path, and not a reachable hub id",
                     "not in the local cache"):
        assert fragment in lines[0], lines[0]


# ----------------------------------------------------------------------------- another dtype of a cached GGUF


def test_another_dtype_of_a_cached_gguf_is_its_float32_entry_rounded_the_same_as_a_dequantization(
        tiny_gguf, tmp_path, monkeypatch):
    """A GGUF dequantizes to float32 and is then rounded to the dtype asked for, so with the float32
    entry cached, a bfloat16 load rounds that entry instead of dequantizing again (on SmolLM2 a whole
    `sw detect` took 5.0-5.2 s instead of 20.0-20.1 s, the weights byte-identical; docs/benchmarks.md). Here: the entry so
    made holds the same files, byte for byte, as one dequantized straight to bfloat16."""
    from superweight.model.gguf import dequantized_gguf

    def entry(cache: Path, dtype: str) -> tuple[Path, list[str]]:
        monkeypatch.setenv("SUPERWEIGHT_CACHE", str(cache))
        notices: list[str] = []
        path, cached = dequantized_gguf(resolve(str(tiny_gguf)), dtype, None, lambda _: None, notices.append)
        assert not cached
        return path, notices

    direct, notices = entry(tmp_path / "direct", "bfloat16")
    assert notices == ["first load of tiny.gguf: dequantizing (llama) and caching it, once; later loads read the cache"]
    entry(tmp_path / "rounded", "float32")
    rounded, notices = entry(tmp_path / "rounded", "bfloat16")
    assert notices == ["first load of tiny.gguf in bfloat16: rounding its cached float32 copy, once"]
    assert rounded.name == direct.name and rounded.name.endswith("-bfloat16")
    files = sorted(p.name for p in direct.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert sorted(p.name for p in rounded.iterdir()) == files
    for name in files:
        assert (rounded / name).read_bytes() == (direct / name).read_bytes(), name
    assert load_model(str(tiny_gguf), dtype="bfloat16").from_cache  # the rounded entry is read as any other


def hub_cache_holding(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache in which `repo_id` at `main` holds `files` (name -> a file to link),
    as huggingface_hub lays it out: what a download once online leaves for later offline runs."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, target in files.items():
        (snapshot / name).symlink_to(target)
    return cache


def test_a_hub_repository_s_gguf_file_is_read_from_the_hub_cache_and_its_coordinates_export_from_anywhere(
        tiny_gguf, tmp_path, empty_cache, monkeypatch):
    import json

    from superweight.coords import SuperWeight, read_coords, write_coords

    """`sw detect OWNER/NAME --gguf-file F` reads F of that hub repository, as from_pretrained(id,
    gguf_file=F) does (downloaded once, from the cache offline); the coordinates file names the file
    read, so `sw export` finds it from any directory; the export's usage names the repository."""
    hub = hub_cache_holding(tmp_path / "hub", "someone/tiny-GGUF", {"tiny.Q8_0.gguf": tiny_gguf})
    source = resolve("someone/tiny-GGUF", revision="main", gguf_file="tiny.Q8_0.gguf", cache_dir=str(hub))
    assert source.kind == "gguf" and source.hub_id == "someone/tiny-GGUF" and Path(source.location).is_file()
    assert Path(source.location) in source.protected_dirs
    result = invoke("detect", "someone/tiny-GGUF", "--gguf-file", "tiny.Q8_0.gguf", "--cache-dir", hub, "-q",
                    "--out", tmp_path / "c.yaml")
    assert result.exit_code == 0, result.output
    made_for = read_coords(tmp_path / "c.yaml")[1]["model"]
    assert made_for == source.location  # the file read, a link into the hub cache's blobs
    write_coords(tmp_path / "one.yaml", [SuperWeight(0, 1, 2)], model=made_for)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    exported = invoke("export", tmp_path / "one.yaml", "--to", "bitsandbytes", "--select", "all", "--json")
    assert exported.exit_code == 0, exported.output
    assert f"from_pretrained({os.path.dirname(made_for)!r}, gguf_file='tiny.Q8_0.gguf'" in json.loads(exported.stdout)["usage"]
    assert_one_line_error(invoke("detect", "someone/tiny-GGUF", "--gguf-file", "other.gguf", "--cache-dir", hub),
                          "other.gguf of the hub model someone/tiny-GGUF is not in the local hub cache", "offline")


def test_consumer_model_of_a_hub_repository_s_gguf_file_names_the_repository(tmp_path):
    from superweight.edit.export import consumer_model
    from superweight.model.source import ModelSource

    source = ModelSource("someone/m-GGUF", "gguf", str(tmp_path / "blob-link.gguf"), revision="v2",
                         hub_id="someone/m-GGUF")
    assert consumer_model(source) == "'someone/m-GGUF', gguf_file='blob-link.gguf', revision='v2'"


@pytest.mark.parametrize("torch_installed, wanted, installs", [
    (False, None, "torch==2.13.0"), (True, None, None), (True, "2.6.0", "torch==2.6.0")])
def test_setup_keeps_a_torch_installed_first_unless_another_is_asked_for(tmp_path, torch_installed, wanted, installs):
    """README: setup.sh pins torch 2.13.0, "set SUPERWEIGHT_TORCH to pick another, or install torch
    yourself first". Run against a stand-in .venv whose python logs what pip is asked to do."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/calls"\n'
                      f'[ "$1" = "-c" ] && exit {0 if torch_installed else 1}\nexit 0\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SUPERWEIGHT_TORCH"}
    if wanted:
        env["SUPERWEIGHT_TORCH"] = wanted
    subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], env=env, check=True, capture_output=True)
    torch_installs = [line for line in (tmp_path / "calls").read_text().splitlines()
                      if line.startswith("-m pip install") and "torch==" in line]
    assert torch_installs == ([f"-m pip install --quiet {installs}"] if installs else [])
