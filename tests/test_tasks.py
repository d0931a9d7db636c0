"""Task table: document reading and prompt construction against real docs, checked by hand
against lm-eval's task definitions (lm_eval/tasks/<task>/*.yaml and helper .py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from superweight.errors import DataError, UsageError
from superweight.measure.tasks import TASKS, hellaswag_clean, load_task, resolve_task_names, wikitext_detokenize

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared evaluation data not present")


def first_prompts(task: str, n: int = 2):
    loaded = load_task(task, DATA_DIR, limit=n)
    return [loaded.task.prompt(doc) for doc in loaded.docs]


def test_table_has_the_eight_tasks_and_all_expands():
    expected = ["wikitext", "lambada_openai", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq", "winogrande"]
    assert sorted(TASKS) == sorted(expected)
    assert sorted(resolve_task_names(["all"])) == sorted(expected)
    assert resolve_task_names("piqa,all")[0] == "piqa" and len(resolve_task_names("piqa,all")) == 8


def test_unknown_task_lists_known_ones():
    with pytest.raises(UsageError, match="unknown task 'mmlu'.*hellaswag.*winogrande"):
        resolve_task_names(["mmlu"])


@needs_data
def test_piqa_prompt():
    first, second = first_prompts("piqa")
    context = "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert first.pairs[0] == (context, " Provide the guinea pig with a cage full of a few inches of bedding made of "
                              "ripped paper strips, you will also need to supply it with a water bottle and a food dish.")
    assert first.gold == 0 and len(first.pairs) == 2
    assert second.pairs[1] == ("Question: dresser\nAnswer:", " finish, woodgrain with  bobby pin ")
    assert second.choices == ("replace drawer with bobby pin ", "finish, woodgrain with  bobby pin ")
    assert second.gold == 1  # valid-labels.lst line 2


@needs_data
def test_arc_prompts():
    easy = first_prompts("arc_easy")[1]
    assert easy.pairs[0][0] == ("Question: Which piece of safety equipment is used to keep mold spores from "
                                "entering the respiratory system?\nAnswer:")
    assert easy.choices == ("safety goggles", "breathing mask", "rubber gloves", "lead apron")
    assert easy.pairs[1][1] == " breathing mask" and easy.gold == 1  # answerKey "B"
    challenge = first_prompts("arc_challenge", 1)[0]
    assert challenge.pairs[0][0].startswith("Question: An astronomer observes that a planet rotates faster")
    assert challenge.gold == 2  # answerKey "C": "Planetary days will become shorter."
    assert challenge.choices[challenge.gold] == "Planetary days will become shorter."


@needs_data
def test_arc_numeric_answer_keys_map_to_positions():
    loaded = load_task("arc_easy", DATA_DIR)
    numeric = next(d for d in loaded.docs if d["answerKey"].isdigit())
    prompt = loaded.task.prompt(numeric)
    assert prompt.gold == numeric["choices"]["label"].index(numeric["answerKey"])


@needs_data
def test_hellaswag_prompt_capitalises_ctx_b_and_cleans():
    first, second = first_prompts("hellaswag")
    assert first.pairs[0] == ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis.")
    assert first.gold == 3 and len(first.pairs) == 4
    assert second.pairs[3] == ("Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
                               " stands and lifts the weight over her head.")


def test_hellaswag_cleaning_of_wikihow_tags():
    # Strip happens before the tags go, so a leading tag leaves a leading space (as in lm-eval).
    assert hellaswag_clean(" [header] How to X [title] Do it. [step] Then  go.") == " How to X. Do it. Then go."


@needs_data
def test_sciq_prompt():
    first = first_prompts("sciq", 1)[0]
    context, continuation = first.pairs[3]
    assert context.startswith("Oxidants and Reductants Compounds that are capable of accepting electrons")
    assert context.endswith("\nQuestion: Compounds that are capable of accepting electrons, such as o 2 or f2, are called what?\nAnswer:")
    assert continuation == " oxidants" and first.gold == 3
    assert first.choices == ("antioxidants", "Oxygen", "residues", "oxidants")


@needs_data
def test_sciq_empty_support_starts_with_newline():
    loaded = load_task("sciq", DATA_DIR)
    doc = next(d for d in loaded.docs if not d["support"].strip())
    assert loaded.task.prompt(doc).pairs[0][0] == f"\nQuestion: {doc['question']}\nAnswer:"


@needs_data
def test_winogrande_partial_prompt():
    first, second = first_prompts("winogrande")
    assert first.pairs == (
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    )
    assert first.gold == 1 and second.gold == 0  # answers "2" and "1"


@needs_data
def test_lambada_prompt_splits_last_word():
    first, second = first_prompts("lambada_openai")
    context, target = first.pairs[0]
    assert context.endswith("his mouth curved in a confident grin, I don't care about")
    assert target == " signs"
    assert second.pairs[0][1] == " Shane" and second.pairs[0][0].endswith('"I can make it there on my own,')


@needs_data
def test_wikitext_documents_words_and_bytes():
    loaded = load_task("wikitext", DATA_DIR)
    assert loaded.n_total == 62
    prompts = [loaded.task.prompt(d) for d in loaded.docs]
    assert sum(p.words for p in prompts) == 241335  # lm-eval counts words on the raw pages
    assert prompts[0].text.startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor.")
    assert "guest-starring" in prompts[0].text
    assert prompts[0].bytes == len(loaded.docs[0]["page"].encode("utf-8"))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("a @-@ b 1 @,@ 000 3 @.@ 5", "a-b 1,000 3.5"),
        ("end . Next , one ; two : three ! four ? five", "end. Next, one; two: three! four? five"),
        ('said " hello there " ( in brackets ) [ x ] { y }', 'said "hello there" (in brackets) [x] {y}'),
        (" = = Career = = \n", " == Career ==\n"),
        (" = = = Early = = = \n", " === Early ===\n"),
        ("Teddy 's Story", "Teddy's Story"),
        ("players ' union", "players' union"),
        ("at 5 ° C", "at 5°C"),
        ("costs N dollars", "costs 1 dollars"),
        ("line one \n line two", "line one\nline two"),
    ],
)
def test_wikitext_detokenizer(raw, expected):
    assert wikitext_detokenize(raw) == expected


@needs_data
def test_sha256_of_data_files_recorded():
    loaded = load_task("piqa", DATA_DIR, limit=1)
    assert loaded.sha256 == {
        "piqa/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
        "piqa/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    }


def test_missing_data_offline_names_files_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"valid\.jsonl, valid-labels\.lst into .*piqa/"):
        load_task("piqa", tmp_path)


def test_missing_data_dir_offline_says_how_to_set_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SUPERWEIGHT_DATA", raising=False)
    with pytest.raises(DataError, match="SUPERWEIGHT_DATA"):
        load_task("winogrande")


def test_data_dir_from_environment(tmp_path, monkeypatch):
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "dev.jsonl").write_text(
        '{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}\n')
    monkeypatch.setenv("SUPERWEIGHT_DATA", os.fspath(tmp_path))
    loaded = load_task("winogrande")
    assert loaded.task.prompt(loaded.docs[0]).pairs == (("A x", " b."), ("A y", " b."))


def test_limit_must_be_positive(tmp_path):
    with pytest.raises(UsageError, match="positive"):
        load_task("piqa", tmp_path, limit=0)


# ----------------------------------------------------------------------------- errors that point at the fix


def test_data_dir_that_does_not_exist_is_its_own_error(tmp_path):
    with pytest.raises(DataError, match=r"--data-dir .*nowhere does not exist; give the folder that holds"):
        load_task("piqa", tmp_path / "nowhere")


def missing_data_message(monkeypatch, data_dir, offline: bool) -> str:
    """The error of `load_task("piqa", data_dir)` with no piqa files there and no hub to fetch them from."""
    from superweight.measure import tasks

    monkeypatch.delenv("SUPERWEIGHT_DATA", raising=False)
    monkeypatch.setattr(tasks, "hub_offline", lambda: offline)

    def no_network(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    with pytest.raises(DataError) as error:
        load_task("piqa", data_dir)
    return str(error.value)


def test_empty_data_dir_names_the_expected_file_online_too(tmp_path, monkeypatch):
    message = missing_data_message(monkeypatch, tmp_path, offline=False)
    assert f"{tmp_path / 'piqa' / 'valid.jsonl'} does not exist" in message
    assert f"into {tmp_path / 'piqa'}/" in message and "DATA_DIR" not in message


@pytest.mark.parametrize("offline", [False, True])
def test_missing_data_without_data_dir_is_one_sentence_with_both_fixes(monkeypatch, offline):
    """No data folder and no download: what failed, then the two fixes (the network, or the files in
    DIR/<task>/ with --data-dir DIR or SUPERWEIGHT_DATA); it read "..., and put ... (--data-dir)"."""
    message = missing_data_message(monkeypatch, None, offline)
    assert message.startswith("missing data for task piqa: HF_HUB_OFFLINE is set" if offline
                              else "cannot download task piqa (hub dataset baber/piqa: ConnectionError)"), message
    fix = ("unset HF_HUB_OFFLINE to fetch it from the hub" if offline else "connect to the network and rerun")
    assert f"; {fix}, or put valid.jsonl, valid-labels.lst into DIR/piqa/ and pass --data-dir DIR (or set " \
           "SUPERWEIGHT_DATA=DIR" in message
    assert "), and put" not in message and "DATA_DIR" not in message


def test_empty_data_dir_offline_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=re_escape(f"{tmp_path / 'piqa' / 'valid.jsonl'} does not exist")):
        load_task("piqa", tmp_path)


def test_a_task_folder_given_as_data_dir_suggests_its_parent(tmp_path):
    piqa = tmp_path / "piqa"
    piqa.mkdir()
    (piqa / "valid.jsonl").write_text('{"goal": "g", "sol1": "a", "sol2": "b"}\n')
    (piqa / "valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match=re_escape(f"holds piqa's own files") + ".*" + re_escape(f"--data-dir {tmp_path}")):
        load_task("piqa", piqa)
    with pytest.raises(DataError, match="holds piqa's own files"):
        load_task("sciq", piqa)
    assert load_task("piqa", tmp_path).n_total == 1  # the parent works


PIQA_DOC = '{"goal": "g", "sol1": "a", "sol2": "b"}'


@pytest.mark.parametrize("task, files, problem", [
    ("piqa", {"valid.jsonl": PIQA_DOC + "\n" + PIQA_DOC[:20], "valid-labels.lst": "0\n1\n"},
     "valid.jsonl line 2 is not JSON (Expecting"),
    ("piqa", {"valid.jsonl": "[1, 2]\n", "valid-labels.lst": "0\n"}, "valid.jsonl line 1 is a JSON list, not an object"),
    ("piqa", {"valid.jsonl": PIQA_DOC + "\n", "valid-labels.lst": "x\n"}, "valid-labels.lst row 1 is 'x', not a label 0 or 1"),
    ("piqa", {"valid.jsonl": PIQA_DOC.replace("sol2", "solution") + "\n", "valid-labels.lst": "0\n"},
     "valid.jsonl: document 1 has no field 'sol2'"),
    ("lambada_openai", {"lambada_test.jsonl": b"\xff\xfe"}, "lambada_test.jsonl is not UTF-8 text"),
    ("lambada_openai", {"lambada_test.jsonl": "\n"}, "no documents found for task lambada_openai in "),
    ("arc_easy", {"ARC-Easy-Test.jsonl": '{"id": "x"}\n'}, "ARC-Easy-Test.jsonl: a document has no field 'question'"),
    ("sciq", {"test.json": '[{"question": "q"'}, "test.json line 1 is not JSON"),
])
def test_a_damaged_data_file_is_named_with_its_line(tmp_path, task, files, problem):
    folder = tmp_path / task
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as error:
        load_task(task, tmp_path, limit=1)
    assert problem in str(error.value)
    assert str(folder) in str(error.value) and str(error.value).endswith("copy it again (README: Evaluation data)")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


@pytest.mark.parametrize("typo, hint", [("wikitxt", "did you mean wikitext?"), ("hellaswg", "did you mean hellaswag?"),
                                        ("mmlu", "--harness mmlu"), ("gsm8k", "--harness gsm8k")])
def test_unknown_task_suggests_the_fix(typo, hint):
    with pytest.raises(UsageError) as error:
        resolve_task_names([typo])
    assert hint in str(error.value) and "known tasks" in str(error.value)


def test_dashes_are_read_as_underscores():
    assert resolve_task_names(["arc-easy,ARC-Challenge", "lambada-openai"]) == ["arc_easy", "arc_challenge",
                                                                                "lambada_openai"]
