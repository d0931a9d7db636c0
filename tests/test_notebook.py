"""A model in memory, many steps, as a notebook does them: a user's own model (built here, never
read from disk) or one loaded once, given to every command function, and never loaded again."""

import pickle

import pytest
import torch
import transformers
from transformers import LlamaForCausalLM

import superweight
from superweight.errors import SuperweightError, UsageError
from superweight.model import load as model_load
from superweight.model import options as model_options

from conftest import DATA_DIR, build_word_tokenizer
from synthetic import VOCAB, plant_super_weight, snapshot, tiny_config

PLANTED = (1, 7, 13)
QUICK = dict(data_dir=str(DATA_DIR), limit=1, max_length=64)


def _refuse(*args, **kwargs):
    raise AssertionError("the library loaded a model, but it was given one in memory")


@pytest.fixture
def no_loading(monkeypatch):
    """Every way the library reads a model from disk or the hub fails the test."""
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig,
                 transformers.PreTrainedModel):
        monkeypatch.setattr(auto, "from_pretrained", _refuse)
    monkeypatch.setattr(model_load, "load_model", _refuse)
    monkeypatch.setattr(model_options, "load_model", _refuse)
    monkeypatch.setattr(model_options.LoadOptions, "load", _refuse)


@pytest.fixture
def own_model():
    """A user's own LlamaForCausalLM, built in memory, whose [1, 7, 13] is a genuine super weight."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("llama")).to(torch.float32)
    plant_super_weight(model, *PLANTED, input_spike=100.0, weight=10.0)
    return model, build_word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))


def test_a_users_own_model_goes_through_detect_ablate_evaluate_without_any_load(own_model, no_loading, tmp_path):
    loaded = superweight.wrap(*own_model, name="my-llama")
    assert (loaded.source.spec, loaded.source.kind, loaded.dtype) == ("my-llama", "memory", "float32")
    found = superweight.detect_model(loaded, out=tmp_path / "c.yaml")
    assert [w.key[:3] for w in found.super_weights] == [PLANTED]
    assert found.model["spec"] == "my-llama" and superweight.read_coords(tmp_path / "c.yaml")[0] == found.super_weights

    before = snapshot(loaded.model)
    down = loaded.model.model.layers[1].mlp.down_proj.weight
    with superweight.ablated(loaded.model, found.super_weights) as record:
        assert down[7, 13] == 0 and record.original_values[0] != 0
        with superweight.restored_activation(loaded.model, record):
            pass
    assert all(torch.equal(before[k], v) for k, v in snapshot(loaded.model).items())  # undone exactly

    evaluation = superweight.evaluate_model(loaded, coords=tmp_path / "c.yaml", compare=True, task=["wikitext"],
                                            **QUICK)
    perplexity = {name: run["results"]["wikitext"]["word_perplexity"] for name, run in evaluation.runs.items()}
    assert perplexity["candidate [1, 7, 13] zeroed"] != perplexity["original"]
    assert evaluation.to_dict()["model"]["spec"] == "my-llama"
    assert all(torch.equal(before[k], v) for k, v in snapshot(loaded.model).items())  # each configuration undone
    again = superweight.evaluate_model(loaded, task=["wikitext"], **QUICK)
    assert again.runs["original"]["results"]["wikitext"]["word_perplexity"] == perplexity["original"]

    saved = superweight.ablate_model(loaded, coord=["1,7,13"], out=tmp_path / "zeroed")
    assert saved.record.original_values[0] == float(before["model.layers.1.mlp.down_proj.weight"][7, 13])
    assert all(torch.equal(before[k], v) for k, v in snapshot(loaded.model).items())  # ablated for the save only


def test_more_steps_on_the_same_model_generate_quantize_study(own_model, no_loading, tmp_path):
    loaded = superweight.wrap(*own_model, name="my-llama")
    before = snapshot(loaded.model)
    generated = superweight.generate_text(loaded, coord=["1,7,13"], prompt="w10 w11", max_new_tokens=2)
    assert [c.name for c in generated.configurations][:2] == ["original", "weight [1, 7, 13] zeroed"]
    quantized = superweight.quantize_model(loaded, coord=["1,7,13"], block_size=[64], task="wikitext", **QUICK)
    assert [row["block_size"] for row in quantized.rows] == [64]
    study = superweight.run_study(loaded, coord=["1,7,13"], task="wikitext", grid="0,1", top=5,
                                  out=tmp_path / "study", **QUICK)
    assert study.report.is_file() and study.meta["model"]["spec"] == "my-llama"
    for result in (generated, quantized, study):  # a notebook keeps its results (pickle, joblib)
        assert pickle.loads(pickle.dumps(result)).to_dict() == result.to_dict()
    assert pickle.loads(pickle.dumps(study)).super_weights == study.super_weights
    assert all(torch.equal(before[k], v) for k, v in snapshot(loaded.model).items())


def test_saving_a_model_prints_nothing(own_model, tmp_path, capfd):
    """transformers draws "Writing model shards: 100%|..." on a save: not in a notebook's library call."""
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as in a fresh notebook (a CLI test in this process turns bars off)
    try:
        loaded = superweight.wrap(*own_model)
        superweight.ablate_model(loaded, coord=["1,7,13"], out=tmp_path / "zeroed")
        superweight.quantize_model(loaded, coord=["1,7,13"], block_size=[64], task="wikitext", out=tmp_path / "rtn",
                                   **QUICK)
    finally:
        if not bars_were_on:
            hf_logging.disable_progress_bar()
    assert (tmp_path / "rtn").is_dir() and capfd.readouterr().err == ""


def test_the_study_cache_knows_a_model_changed_in_memory(own_model, tmp_path):
    """Same name, other weights: the cached evaluations of the first must not stand for the second."""
    loaded = superweight.wrap(*own_model, name="my-llama")
    options = dict(coord=["1,7,13"], task="wikitext", grid="1", top=5, out=tmp_path / "study", force=True, **QUICK)
    first = superweight.run_study(loaded, **options)
    assert superweight.run_study(loaded, **options).meta["evaluations"]["from_cache"] == first.meta["evaluations"]["total"]
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    changed = superweight.run_study(loaded, **options).meta["evaluations"]
    assert changed["from_cache"] == first.meta["evaluations"]["from_cache"] < changed["total"]  # as on a first run


def test_a_model_in_memory_takes_no_loading_options(own_model):
    loaded = superweight.wrap(*own_model)
    with pytest.raises(UsageError, match="already in memory"):
        superweight.detect_model(loaded, options=superweight.LoadOptions(dtype="float16"))
    with pytest.raises(UsageError, match="already in memory"):
        superweight.detect_model(loaded, stream=True)


def test_a_wrapped_model_read_from_a_directory_protects_it(tiny_llama_dir):
    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    loaded = superweight.wrap(model, transformers.AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert (loaded.source.kind, loaded.source.location) == ("local", str(tiny_llama_dir))
    with pytest.raises(SuperweightError, match="inside"):
        superweight.detect_model(loaded, out=tiny_llama_dir / "c.yaml")
    assert not (tiny_llama_dir / "c.yaml").exists()


def test_load_options_reach_the_load(tiny_llama_dir):
    loaded = superweight.load(str(tiny_llama_dir), superweight.LoadOptions(dtype="float16", device="cpu"))
    assert (loaded.dtype, loaded.source.kind) == ("float16", "local")
    with pytest.raises(UsageError, match="--max-memory"):
        superweight.load(str(tiny_llama_dir), superweight.LoadOptions(max_memory="lots"))


def test_everything_public_is_listed_and_importing_the_package_reads_no_torch():
    import subprocess
    import sys

    for name in superweight.__all__:
        assert getattr(superweight, name) is not None, name
    code = "import sys, superweight; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_every_public_signature_resolves_its_type_hints():
    """Editors, `help()` and tools such as pydantic or typer read hints with get_type_hints: a name
    that resolves only under TYPE_CHECKING makes it raise NameError."""
    import inspect
    import typing

    for name in superweight.__all__:
        value = getattr(superweight, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            typing.get_type_hints(value)


def test_distributed_is_reached_from_a_plain_import_as_readme_writes_it():
    """README: a script torchrun starts runs `with superweight.distributed.session():` after
    `import superweight`, with nothing else imported first."""
    import subprocess
    import sys

    code = ("import superweight; print(callable(superweight.distributed.session), "
            "callable(superweight.distributed.is_main), 'distributed' in dir(superweight))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "True True True"


@pytest.mark.integration
def test_smollm2_loaded_once_goes_through_detect_evaluate_generate(smollm2, no_loading, tmp_path):
    found = superweight.detect_model(smollm2, out=tmp_path / "c.yaml")
    assert [11, 507, 1229] in [list(w.key[:3]) for w in found.super_weights]
    evaluation = superweight.evaluate_model(smollm2, coords=tmp_path / "c.yaml", task=["wikitext"], limit=1,
                                            max_length=128, data_dir=str(DATA_DIR))
    assert set(evaluation.runs) == {"5 candidates zeroed"}  # not verified: every candidate, named as such
    generated = superweight.generate_text(smollm2, coords=tmp_path / "c.yaml", prompt="Paris is", max_new_tokens=2)
    assert generated.model["spec"] == "smollm2-135m" and len(generated.generations) == len(generated.configurations)


def test_verify_reads_no_more_of_its_text_than_a_users_model_has_positions(tmp_path):
    """A model with learned positions (GPT-2's family) has none beyond its context: --verify's text
    is cut to it, not fed past it (an IndexError from the position embedding)."""
    from synthetic import tiny_model

    model = tiny_model("gpt2")  # 64 positions; the shipped verification text is a few hundred tokens
    plant_super_weight(model, *PLANTED, input_spike=100.0, weight=10.0)
    loaded = superweight.wrap(model, build_word_tokenizer([f"w{i}" for i in range(VOCAB - 3)]))
    text = tmp_path / "long.txt"
    text.write_text(" ".join(f"w{i % 100}" for i in range(300)))
    found = superweight.detect_model(loaded, out=tmp_path / "c.yaml", verify=True, verify_text=text)
    assert found.verification.num_tokens == model.config.n_positions
    assert [w.key[:3] for w in found.super_weights] == [PLANTED]


@pytest.mark.parametrize("chat_template", [False, True])
def test_a_prompt_longer_than_a_users_models_context_is_refused_in_one_line(tmp_path, chat_template):
    """GPT-2's family has no position past n_positions: a longer prompt is refused before any pass
    (not an IndexError from the position embedding), and not cut either (the coordinates file
    records the prompt the activation was seen on). One exactly as long as the context runs."""
    from synthetic import tiny_model

    model = tiny_model("gpt2")  # 64 positions
    plant_super_weight(model, *PLANTED, input_spike=100.0, weight=10.0)
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(VOCAB - 3)])
    if chat_template:
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    loaded = superweight.wrap(model, tokenizer)
    with pytest.raises(UsageError) as error:
        superweight.detect_model(loaded, prompt=" ".join(f"w{i % 50}" for i in range(100)), out=tmp_path / "c.yaml",
                                 chat_template=chat_template)
    message = str(error.value)
    assert "the prompt is 100 tokens" in message and "at most 64" in message and "\n" not in message
    assert not (tmp_path / "c.yaml").exists()
    found = superweight.detect_model(loaded, prompt=" ".join(f"w{i % 50}" for i in range(64)), out=tmp_path / "c.yaml",
                                     chat_template=chat_template)
    assert found.detection.num_tokens == 64


def test_verify_on_a_users_text_says_so(own_model):
    """verify(text=...) measured on the caller's text: its result must not name the shipped text."""
    model, tokenizer = own_model
    text = " ".join(f"w{i}" for i in range(40))
    verification = superweight.verify(model, tokenizer, [superweight.SuperWeight(*PLANTED)], text=text, prompts=())
    assert verification.text_source == "the text given to verify()" and verification.num_tokens == 40
    assert verification.to_dict()["text"] == verification.text_source


def test_a_library_error_names_the_keyword_the_caller_passed(own_model, tiny_llama_dir):
    """The checks are shared with `sw`, whose messages name its options; a notebook passed keywords."""
    from typer.testing import CliRunner

    from superweight.cli import app

    loaded = superweight.wrap(*own_model)
    with pytest.raises(UsageError, match=r"^--max-length \(max_length=\) must be at least 2 tokens, got 1$"):
        superweight.evaluate_model(loaded, task=["wikitext"], max_length=1, data_dir=str(DATA_DIR))
    with pytest.raises(UsageError, match=r"--verify \(verify=True\)"):
        superweight.detect_model(loaded, verify_text="text.txt")
    with pytest.raises(UsageError, match=r"--max-memory \(LoadOptions\(max_memory=\)\)"):
        superweight.load(str(tiny_llama_dir), superweight.LoadOptions(max_memory="lots"))
    with pytest.raises(UsageError, match=r"^--limit \(limit=\) must"):
        superweight.evaluate(*own_model, ["wikitext"], limit=0, data_dir=str(DATA_DIR))
    # `sw` keeps its own words
    result = CliRunner().invoke(app, ["eval", str(tiny_llama_dir), "-q", "--task", "wikitext", "--max-length", "1",
                                      "--data-dir", str(DATA_DIR)])
    assert result.exit_code == 2 and "--max-length must be at least 2" in result.output and "max_length=" not in result.output


def test_results_show_briefly_on_a_cells_last_line(own_model, no_loading, tmp_path):
    """A notebook prints the object a cell ends with: its class, its short fields as they are, the
    long ones by type and size, the weights by coordinates; not kilobytes of tables or a module tree."""
    loaded = superweight.wrap(*own_model, name="my-llama")
    found = superweight.detect_model(loaded, out=tmp_path / "c.yaml")
    evaluation = superweight.evaluate_model(loaded, coord=["1,7,13"], compare=True, task=["wikitext"], **QUICK)
    saved = superweight.ablate_model(loaded, coord=["1,7,13"], out=tmp_path / "zeroed")
    shown = {type(result).__name__: repr(result) for result in (loaded, found, evaluation, saved)}
    for name, text in shown.items():
        print(text)
        assert text.startswith(name + "(") and len(text) <= 500, text
    assert "model=<LlamaForCausalLM>" in shown["LoadedModel"] and "source=<ModelSource 'my-llama'>" in shown["LoadedModel"]
    assert "super_weights=[[1, 7, 13]]" in shown["DetectionResult"]
    assert f"coords_path='{tmp_path / 'c.yaml'}'" in shown["DetectionResult"]
    assert "runs=<dict of 4>" in shown["EvaluationResult"]
    assert f"out='{tmp_path / 'zeroed'}'" in shown["AblationResult"] and "changed=1" in shown["AblationResult"]


class Notes(superweight.Reporter):
    """Keeps the notes and warnings a command reports."""

    def __init__(self):
        self.notes, self.warnings = [], []

    def note(self, message):
        self.notes.append(message)

    def warn(self, message):
        self.warnings.append(message)


def test_the_library_writes_no_file_it_was_not_asked_for(own_model, no_loading, tmp_path, monkeypatch):
    """A notebook cell run twice: without out= detect_model writes no ./<model>.superweights.yaml
    (`sw detect` passes its default itself), so the second run is not refused as "exists"; its result
    goes to the other functions as coords=, and no function writes what no argument named."""
    monkeypatch.chdir(tmp_path)
    loaded = superweight.wrap(*own_model, name="my-llama")
    found = superweight.detect_model(loaded)
    again = superweight.detect_model(loaded)
    assert found.coords_path is None and found.to_dict()["coordinates_file"] is None
    assert again.super_weights == found.super_weights and [w.key[:3] for w in found.super_weights] == [PLANTED]
    evaluation = superweight.evaluate_model(loaded, coords=found, compare=True, task=["wikitext"], **QUICK)
    assert list(evaluation.runs)[1] == "candidate [1, 7, 13] zeroed"
    superweight.generate_text(loaded, coords=found, prompt="w10", max_new_tokens=1)
    superweight.quantize_model(loaded, coords=found, block_size=[64], task="wikitext", **QUICK)
    with pytest.raises(TypeError, match="'out'"):  # the study's result is its report: a folder the caller names
        superweight.run_study(loaded, coords=found, task="wikitext", **QUICK)
    with pytest.raises(UsageError, match=r"^--out \(out=\) names the folder the report is written to"):
        superweight.run_study(loaded, coords=found, task="wikitext", out=None, **QUICK)
    assert {path.name for path in tmp_path.iterdir()} <= {"cache"}  # SUPERWEIGHT_CACHE (private_cache)


def test_a_detection_result_is_taken_as_the_file_it_would_have_written(own_model, no_loading, tmp_path):
    """coords=found: the entries, their verified roles and the model they were made for, as the
    file `out=` writes holds them; select= narrows them alike, and names where they came from."""
    from superweight.errors import CoordinatesError

    loaded = superweight.wrap(*own_model, name="my-llama")
    found = superweight.detect_model(loaded, verify=True)
    written = superweight.detect_model(loaded, verify=True, out=tmp_path / "c.yaml")
    entries, meta = superweight.read_coords(tmp_path / "c.yaml")
    assert found.coordinates.weights == entries and entries[0].role == "inert"  # a random tiny model's: inert
    assert found.coordinates.meta == meta and found.coordinates.path is None
    assert written.coordinates.path == tmp_path / "c.yaml" and written.coordinates.name == str(tmp_path / "c.yaml")
    unverified = superweight.detect_model(loaded)
    superweight.detect_model(loaded, out=tmp_path / "plain.yaml")

    def acting(coords, select):
        """What a command says it acts on, or why it refuses, with the file named as the result is."""
        notes = Notes()
        try:
            superweight.generate_text(loaded, coords=coords, select=select, prompt="w10", max_new_tokens=1,
                                      reporter=notes)
        except CoordinatesError as error:
            said = [str(error)]
        else:
            said = [note for note in notes.notes if note.startswith("acting on")]
        return [line.replace(str(tmp_path / "c.yaml"), "the detection of my-llama")
                .replace(str(tmp_path / "plain.yaml"), "the detection of my-llama") for line in said]

    for result, path in ((found, tmp_path / "c.yaml"), (unverified, tmp_path / "plain.yaml")):
        for select in ("super", "all"):
            assert acting(result, select) == acting(path, select)
    refused = acting(found, "super")[0]  # its measured role goes with it
    assert "the detection of my-llama holds no super weights (role super) (roles there: inert)" in refused
    assert acting(unverified, "super") == ["acting on the only candidate of the detection of my-llama: it records no "
                                           "measured roles, so super weights cannot be told from candidates (make it "
                                           "with `sw detect --verify`): [1, 7, 13]"]


def test_a_detection_of_another_model_is_refused_as_its_file_is(own_model, tmp_path):
    """Coordinates carry the model they were made for, in a file or in a result: applied to another
    model both are told (another model_type) and refused (the recorded values differ) alike."""
    from superweight.errors import CoordinatesError
    from synthetic import tiny_model

    found = superweight.detect_model(superweight.wrap(*own_model, name="my-llama"))
    superweight.detect_model(superweight.wrap(*own_model, name="my-llama"), out=tmp_path / "c.yaml")
    other = superweight.wrap(tiny_model("mistral"), own_model[1], name="other")
    told, refused = [], []
    for coords in (tmp_path / "c.yaml", found):
        notes = Notes()
        with pytest.raises(CoordinatesError) as error:
            superweight.evaluate_model(other, coords=coords, task=["wikitext"], reporter=notes, **QUICK)
        told.append([warning.replace(str(tmp_path / "c.yaml"), "the detection of my-llama")
                     for warning in notes.warnings])
        refused.append(str(error.value))
    assert told[0] == told[1] and len(told[0]) == 1 and "not for other (mistral)" in told[0][0]
    assert refused[0] == refused[1] and "another model" in refused[0]


def test_coords_takes_a_file_or_a_detection_result_only(own_model, tmp_path):
    """An output never replaces the file a result was written to, as it never replaces the file
    coords= names; anything else given as coords= is refused in one line."""
    from superweight.errors import SuperweightError

    loaded = superweight.wrap(*own_model, name="my-llama")
    written = superweight.detect_model(loaded, out=tmp_path / "c.yaml")
    with pytest.raises(SuperweightError, match="it is the coordinates file"):
        superweight.evaluate_model(loaded, coords=written, task=["wikitext"], output=tmp_path / "c.yaml", force=True,
                                   **QUICK)
    with pytest.raises(SuperweightError, match=r"^--coords \(coords=\) takes a coordinates file .*not a list$"):
        superweight.generate_text(loaded, coords=written.super_weights, prompt="w10", max_new_tokens=1)
