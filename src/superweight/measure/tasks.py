"""The evaluation tasks, declared in one table, formatted exactly as lm-evaluation-harness does.

Every task is a `Task` row: which files it reads, how a document becomes prompts, how its requests
are built, and which metrics it reports (defined once in `metrics`). Local readers return documents in the shape of the Hugging Face dataset lm-eval loads
(e.g. ARC's nested `question.stem` is flattened), so the same prompt functions serve local files
and the hub fallback. Prompt definitions follow lm-eval's task yamls (`lm_eval/tasks/<task>/`).

Scoring kinds (what is scored; the row's metrics say what is computed from it):
  choice   one context, one continuation per choice (" " + choice)
  partial  one context per choice, one shared continuation (WinoGrande partial scoring)
  greedy   one context, one continuation (LAMBADA)
  rolling  whole document scored with rolling windows
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError, UsageError, closest_name
from ..model.hub import hub_offline
from .limits import check_limits
from .metrics import ACC, ACC_NORM, BITS_PER_BYTE, BYTE_PERPLEXITY, GREEDY_ACC, PERPLEXITY, WORD_PERPLEXITY, Metric

Doc = dict[str, Any]

# lm-eval joins context and choice with its default target delimiter.
TARGET_DELIMITER = " "


@dataclass(frozen=True)
class Prompt:
    """What to score for one document.

    `pairs` are (context, continuation) strings; `choices` are the choice texts whose character
    lengths normalise acc_norm; `gold` indexes `pairs`. Rolling tasks set `text` instead.
    """

    pairs: tuple[tuple[str, str], ...] = ()
    choices: tuple[str, ...] = ()
    gold: int = 0
    text: str = ""
    words: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class HubSource:
    """The Hugging Face dataset lm-eval loads; fetched as the hub's parquet conversion."""

    repo_id: str
    config: str
    split: str


@dataclass(frozen=True)
class Task:
    name: str
    scoring: str  # "choice" | "partial" | "greedy" | "rolling"
    files: tuple[str, ...]  # relative to <data_dir>/<name>/; the first one holds the documents
    read: Callable[[Path], list[Doc]]  # task directory -> documents (HF shape)
    prompt: Callable[[Doc], Prompt]
    metrics: tuple[Metric, ...]  # what the results report, in this order
    hub: HubSource


# ----------------------------------------------------------------------------- readers


def _damaged(path: Path, where: str, what: str) -> DataError:
    """A data file that does not read as its task's format: a cut-off copy, or another file."""
    return DataError(f"{path}{where} {what}; the file is damaged or not this task's: copy it again (README: Evaluation data)")


def _read_text_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 file, with their 1-based numbers."""
    try:
        with open(path, encoding="utf-8") as f:
            return [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError:
        raise _damaged(path, "", "is not UTF-8 text") from None


def _read_jsonl(path: Path) -> list[Doc]:
    docs = []
    for number, line in _read_text_lines(path):
        try:
            doc = json.loads(line)
        except ValueError as e:
            raise _damaged(path, f" line {number}", f"is not JSON ({e.msg})") from None
        if not isinstance(doc, dict):
            raise _damaged(path, f" line {number}", f"is a JSON {type(doc).__name__}, not an object")
        docs.append(doc)
    return docs


def _read_labels(path: Path) -> list[str]:
    return [line.strip() for _, line in _read_text_lines(path)]


def _read_piqa(task_dir: Path) -> list[Doc]:
    docs = _read_jsonl(task_dir / "valid.jsonl")
    labels = _read_labels(task_dir / "valid-labels.lst")
    if len(labels) != len(docs):
        raise DataError(f"{task_dir}: valid.jsonl has {len(docs)} rows but valid-labels.lst {len(labels)}; re-copy both files")
    bad = next((i for i, label in enumerate(labels) if label not in ("0", "1")), None)
    if bad is not None:
        raise _damaged(task_dir / "valid-labels.lst", f" row {bad + 1}", f"is {labels[bad]!r}, not a label 0 or 1")
    return [{**doc, "label": int(label)} for doc, label in zip(docs, labels)]


def _read_arc(file_name: str) -> Callable[[Path], list[Doc]]:
    def read(task_dir: Path) -> list[Doc]:
        # The AI2 release nests stem and choices; HF `allenai/ai2_arc` flattens them.
        return [
            {
                "id": row["id"],
                "question": row["question"]["stem"],
                "choices": {
                    "text": [c["text"] for c in row["question"]["choices"]],
                    "label": [c["label"] for c in row["question"]["choices"]],
                },
                "answerKey": row["answerKey"],
            }
            for row in _read_jsonl(task_dir / file_name)
        ]

    return read


def _read_sciq(task_dir: Path) -> list[Doc]:
    path = task_dir / "test.json"
    try:
        docs = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _damaged(path, "", "is not UTF-8 text") from None
    except ValueError as e:
        raise _damaged(path, f" line {e.lineno}", f"is not JSON ({e.msg})") from None
    if not isinstance(docs, list) or not all(isinstance(doc, dict) for doc in docs):
        raise _damaged(path, "", "is not a JSON list of objects")
    return docs


def _reader(file_name: str) -> Callable[[Path], list[Doc]]:
    return lambda task_dir: _read_jsonl(task_dir / file_name)


# ----------------------------------------------------------------------------- prompts


def choice_prompt(context: str, choices: list[str], gold: int) -> Prompt:
    return Prompt(
        pairs=tuple((context, TARGET_DELIMITER + choice) for choice in choices),
        choices=tuple(choices),
        gold=gold,
    )


def _arc_prompt(doc: Doc) -> Prompt:
    labels = list(doc["choices"]["label"])
    return choice_prompt(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), labels.index(doc["answerKey"]))


def hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: drop WikiHow bracket tags and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_prompt(doc: Doc) -> Prompt:
    # str.capitalize() also lower-cases the rest of ctx_b; lm-eval does exactly this.
    context = hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return choice_prompt(context, [hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _sciq_prompt(doc: Doc) -> Prompt:
    context = f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:"
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return choice_prompt(context, choices, 3)


def _winogrande_prompt(doc: Doc) -> Prompt:
    # Partial scoring: the sentence up to "_" with each option substituted is the context; the
    # rest of the sentence is the continuation scored under both contexts.
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    continuation = TARGET_DELIMITER + doc["sentence"][blank + 1 :].strip()
    return Prompt(pairs=tuple((c, continuation) for c in contexts), choices=tuple(contexts), gold=int(doc["answer"]) - 1)


def _lambada_prompt(doc: Doc) -> Prompt:
    words = doc["text"].split(" ")
    return Prompt(pairs=((" ".join(words[:-1]), " " + words[-1]),))


def wikitext_detokenize(page: str) -> str:
    """Undo WikiText tokenisation the way lm-eval's `wikitext_detokenizer` does (order matters)."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)  # a no-op pattern in lm-eval, kept for fidelity
    for spaced, joined in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        s = s.replace(spaced, joined)
    for mark in ":;.!?,":
        s = s.replace(f" {mark} ", f"{mark} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for spaced, joined in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" \u00b0 ", "\u00b0")):
        s = s.replace(spaced, joined)
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    return s.replace(" 's", "'s")


def _wikitext_prompt(doc: Doc) -> Prompt:
    page = doc["page"]
    # Words and bytes are counted on the original page, before detokenising (as lm-eval does).
    return Prompt(text=wikitext_detokenize(page), words=len(re.split(r"\s+", page)), bytes=len(page.encode("utf-8")))


# ----------------------------------------------------------------------------- the table

_CHOICE_METRICS = (ACC, ACC_NORM)

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "wikitext", "rolling", ("wikitext-2-raw-v1_test_documents.jsonl",),
            _reader("wikitext-2-raw-v1_test_documents.jsonl"), _wikitext_prompt,
            (WORD_PERPLEXITY, BYTE_PERPLEXITY, BITS_PER_BYTE),
            HubSource("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"),
        ),
        Task(
            "lambada_openai", "greedy", ("lambada_test.jsonl",), _reader("lambada_test.jsonl"), _lambada_prompt,
            (GREEDY_ACC, PERPLEXITY), HubSource("EleutherAI/lambada_openai", "default", "test"),
        ),
        Task(
            "piqa", "choice", ("valid.jsonl", "valid-labels.lst"), _read_piqa,
            lambda d: choice_prompt(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"])),
            _CHOICE_METRICS, HubSource("baber/piqa", "default", "validation"),
        ),
        Task(
            "arc_easy", "choice", ("ARC-Easy-Test.jsonl",), _read_arc("ARC-Easy-Test.jsonl"), _arc_prompt,
            _CHOICE_METRICS, HubSource("allenai/ai2_arc", "ARC-Easy", "test"),
        ),
        Task(
            "arc_challenge", "choice", ("ARC-Challenge-Test.jsonl",), _read_arc("ARC-Challenge-Test.jsonl"), _arc_prompt,
            _CHOICE_METRICS, HubSource("allenai/ai2_arc", "ARC-Challenge", "test"),
        ),
        Task(
            "hellaswag", "choice", ("hellaswag_val.jsonl",), _reader("hellaswag_val.jsonl"), _hellaswag_prompt,
            _CHOICE_METRICS, HubSource("Rowan/hellaswag", "default", "validation"),
        ),
        Task(
            "sciq", "choice", ("test.json",), _read_sciq, _sciq_prompt,
            _CHOICE_METRICS, HubSource("allenai/sciq", "default", "test"),
        ),
        Task(
            "winogrande", "partial", ("dev.jsonl",), _reader("dev.jsonl"), _winogrande_prompt,
            (ACC,), HubSource("allenai/winogrande", "winogrande_xl", "validation"),
        ),
    )
}


# Benchmarks people ask for that lm-eval has and this table does not: `--harness NAME` runs them.
HARNESS_ONLY = ("mmlu", "gsm8k", "truthfulqa", "openbookqa", "boolq", "race", "triviaqa", "lambada")


def _unknown_task(name: str) -> UsageError:
    """An unknown task name, with the nearest known one (or `--harness`) as the fix."""
    known = f"known tasks: {', '.join(TASKS)} (or 'all')"
    if name in HARNESS_ONLY or name.split("_")[0] in HARNESS_ONLY:
        return UsageError(f"unknown task {name!r}; it is one of lm-eval's: run it with --harness {name} "
                          f"(the [harness] extra); {known}")
    close = closest_name(name, TASKS, cutoff=0.6)
    hint = f"did you mean {close}? " if close else ""
    return UsageError(f"unknown task {name!r}; {hint}{known}")


def resolve_task_names(names: list[str] | str) -> list[str]:
    """Expand `all`, drop duplicates (keeping order) and reject unknown names. Names are matched
    case-insensitively, with '-' read as '_' (`arc-easy` is `arc_easy`), and each entry may hold
    several, comma-separated (`piqa,arc_easy`)."""
    if isinstance(names, str):
        names = [names]
    resolved: list[str] = []
    for name in (n.strip().lower().replace("-", "_") for entry in names for n in entry.split(",") if n.strip()):
        expanded = list(TASKS) if name == "all" else [name]
        for task in expanded:
            if task not in TASKS:
                raise _unknown_task(name)
            if task not in resolved:
                resolved.append(task)
    if not resolved:
        raise UsageError(f"no task given; choose from: {', '.join(TASKS)} (or 'all')")
    return resolved


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedTask:
    task: Task
    docs: list[Doc]  # the first `limit` documents
    n_total: int  # documents in the split
    sha256: dict[str, str]  # data file -> sha256


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_root(data_dir: str | os.PathLike | None) -> Path | None:
    chosen = data_dir or os.environ.get("SUPERWEIGHT_DATA")
    return Path(chosen).expanduser() if chosen else None


def check_data_root(root: Path, option: str = "--data-dir ") -> None:
    """A `--data-dir` that does not exist is a mistake to name now, before any download is tried."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"{option}{root} {what}; give the folder that holds one folder per task "
                        f"(e.g. DATA_DIR/piqa/valid.jsonl; README: Evaluation data)")


def check_not_a_task_folder(root: Path, option: str = "--data-dir ") -> None:
    """A `--data-dir` that is one task's own folder (it holds that task's files, e.g. `data/piqa`)
    is recognised, and its parent suggested."""
    for task in TASKS.values():
        if all((root / f).is_file() for f in task.files):
            raise DataError(f"{option}{root} holds {task.name}'s own files, not one folder per task; "
                            f"give its parent folder: {option}{root.parent}")


def load_task(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> LoadedTask:
    """Read a task's documents from `<data_dir>/<task>/`, else (online) from the hub."""
    task = TASKS[resolve_task_names([name])[0]]
    check_limits(limit)
    root = data_root(data_dir)
    option = "--data-dir " if data_dir else "SUPERWEIGHT_DATA="
    if root is not None:
        check_data_root(root, option)
    task_dir = root / task.name if root else None
    missing = [f for f in task.files if task_dir is None or not (task_dir / f).is_file()]
    if missing and root is not None:
        check_not_a_task_folder(root, option)
    if not missing:
        docs = _read_documents(task, task_dir)
        sha = {f"{task.name}/{f}": sha256_file(task_dir / f) for f in task.files}
    elif hub_offline():
        absent = f"{task_dir / missing[0]} does not exist and " if task_dir else ""
        raise DataError(f"missing data for task {task.name}: {absent}HF_HUB_OFFLINE is set, so it is not downloaded; "
                        f"unset HF_HUB_OFFLINE to fetch it from the hub, or {_how_to_supply(task, task_dir)}")
    else:
        docs, sha = _load_from_hub(task, task_dir)
    if not docs:
        where = f" in {task_dir / task.files[0]}" if not missing else ""
        raise DataError(f"no documents found for task {task.name}{where}; the file is empty or cut off: copy it again "
                        "(README: Evaluation data)")
    kept = docs[:limit] if limit else docs
    _check_prompts(task, kept, task_dir / task.files[0] if not missing else f"the hub dataset {task.hub.repo_id}")
    return LoadedTask(task, kept, len(docs), sha)


_MALFORMED = (KeyError, IndexError, TypeError, ValueError, AttributeError)  # a field missing or of another type


def _malformed(task: Task, where: Any, index: int | None, error: Exception) -> DataError:
    what = f"has no field {error.args[0]!r}" if isinstance(error, KeyError) and error.args else \
        f"does not read as a {task.name} document ({type(error).__name__}: {error})"
    which = "a document" if index is None else f"document {index + 1}"
    return DataError(f"{where}: {which} {what}; the file is damaged or not this task's: copy it again "
                     "(README: Evaluation data)")


def _read_documents(task: Task, task_dir: Path) -> list[Doc]:
    """The task's documents from its folder; a reader that finds a field missing says which."""
    try:
        return task.read(task_dir)
    except _MALFORMED as e:  # DataError (the readers' own) is none of these, and passes through
        raise _malformed(task, task_dir / task.files[0], None, e) from None


def _check_prompts(task: Task, docs: list[Doc], where: Any) -> None:
    """Every kept document makes its prompt now (cheap string work), so a missing field fails here,
    before a model is loaded, not in the middle of scoring."""
    for index, doc in enumerate(docs):
        try:
            task.prompt(doc)
        except _MALFORMED as e:
            raise _malformed(task, where, index, e) from None


def _how_to_supply(task: Task, task_dir: Path | None) -> str:
    """The local way to give a task's data, for an error: its files, and the folder they go in (the
    one already looked in, else DIR and the two ways to name it)."""
    files = ", ".join(task.files)
    if task_dir is not None:
        return f"put {files} into {task_dir}/"
    return f"put {files} into DIR/{task.name}/ and pass --data-dir DIR (or set SUPERWEIGHT_DATA=DIR; README: Evaluation data)"


def _load_from_hub(task: Task, task_dir: Path | None = None) -> tuple[list[Doc], dict[str, str]]:
    """Fetch the dataset lm-eval uses from the hub's automatic parquet conversion; `task_dir` is
    where the local files were looked for (named in the error when the download fails too)."""
    absent = (f"{task_dir / next(f for f in task.files if not (task_dir / f).is_file())} does not exist"
              if task_dir is not None else "no local copy was given")
    instead = _how_to_supply(task, task_dir)
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise DataError(f"cannot download {task.name}: {e.name} is not installed; install it, or {instead}") from None
    src = task.hub
    pattern = f"{src.config}/{src.split}/*.parquet"
    try:
        local = Path(snapshot_download(src.repo_id, repo_type="dataset", revision="refs/convert/parquet", allow_patterns=[pattern]))
    except Exception as e:  # network, auth or missing-repo errors all mean the same to the user
        raise DataError(f"cannot download task {task.name} (hub dataset {src.repo_id}: {e.__class__.__name__}) and "
                        f"{absent}; connect to the network and rerun, or {instead}") from None
    files = sorted(local.glob(pattern))
    if not files:
        raise DataError(f"{src.repo_id} has no {pattern}; {instead}")
    docs = [row for f in files for row in pq.read_table(f).to_pylist()]
    sha = {f"hf://datasets/{src.repo_id}/{f.relative_to(local)}": sha256_file(f) for f in files}
    return docs, sha
