"""README's Library section, run as written: its snippets, in order, on the offline SmolLM2."""

import re

import pytest

from conftest import DATA_DIR, REPO


def library_snippets() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_library_section_shows_loading_once():
    code = "\n".join(library_snippets())
    assert code.count("superweight.load(") == 1 and "superweight.wrap(" in code
    assert not re.search(r"_model\(\"|run_study\(\"|generate_text\(\"", code)  # no command is given a name


def test_the_library_section_hands_the_detection_on_without_a_file():
    """A notebook needs no coordinates file: the result of `detect_model` is `coords=` itself."""
    code = "\n".join(library_snippets())
    assert "found = superweight.detect_model(loaded)\n" in code and ".superweights." not in code
    assert all(f"{name}(loaded, coords=found," in code for name in ("evaluate_model", "run_study", "generate_text"))


def test_the_library_section_reads_the_study_table_as_numbers():
    """report.json's table holds numbers; a notebook reading README gets the same, not the text
    of the printed table ("0.5000 ± 0.5000")."""
    code = "\n".join(library_snippets())
    assert "table.values" in code and "table.rows" not in code


@pytest.mark.integration
def test_readme_library_section_runs_as_written(gguf_cache, tmp_path, monkeypatch, capsys):
    """Each output the snippets show is printed; the model is loaded once."""
    from superweight.model import load as model_load

    blocks = library_snippets()
    assert len(blocks) >= 4
    # SmolLM2's dequantized GGUF from the session cache; the study's evaluation cache in tmp_path
    (gguf_cache / "gguf").mkdir(exist_ok=True)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "gguf").symlink_to(gguf_cache / "gguf")
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SUPERWEIGHT_DATA", str(DATA_DIR))
    monkeypatch.chdir(tmp_path)
    loads = []
    load_model = model_load.load_model
    monkeypatch.setattr("superweight.model.options.load_model",
                        lambda *args, **kwargs: loads.append(args) or load_model(*args, **kwargs))
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    code = "\n".join(blocks)
    # the output shown after a print, on its line or on the comment line below it
    shown = re.findall(r"^print\(.*\)\s+# (.+)$", code, flags=re.M)
    shown += re.findall(r"^print\(.*\)\n# (.+)$", code, flags=re.M)
    assert len(shown) >= 3
    for text in shown:
        assert text in printed
    assert len(loads) == 1
    assert (tmp_path / "smollm2-study" / "REPORT.md").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache", "smollm2-study"]  # nothing unasked
    table = namespace["table"]
    assert all(isinstance(v, float) for row in table.values for v in row), table.values
    assert [run["ablation"]["kind"] for run in namespace["evaluation"].runs.values()] == [
        "unchanged", "ablated", "restored", "control"]
    assert namespace["zeroed"] > 2 * namespace["perplexity"]() and namespace["restored"] < namespace["zeroed"]
    assert [w.key for w in namespace["result"].super_weights] == [w.key for w in namespace["found"].super_weights]
