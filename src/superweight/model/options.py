"""How to load a model, as one object: the eight options every command that loads a model takes
(`--revision`, `--gguf-file`, `--dtype`, `--device`, `--device-map`, `--max-memory`,
`--trust-remote-code`, `--cache-dir`), and `load`, a model in memory by name with them.

The CLI builds one `LoadOptions` per command from its flags; a notebook builds one (or none: the
defaults are the CLI's) and passes it to `superweight.load` or to any command function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .hub import Progress
from .load import LoadedModel, load_model
from .source import ModelSource, resolve
from .devices import parse_device_map, parse_max_memory


@dataclass(frozen=True)
class LoadOptions:
    """What `from_pretrained` users pass, as the CLI takes it: `device_map` is an accelerate
    strategy, a JSON object / .json file as text, or a dict; `max_memory` is `0=20GiB,cpu=64GiB`
    as text, or accelerate's dict."""

    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    device_map: Optional[str | dict] = None
    max_memory: Optional[str | dict] = None
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None

    def resolve(self, spec: Optional[str]) -> ModelSource:
        """Where MODEL comes from (alias, .gguf file, directory or hub id), without loading it."""
        return resolve(spec, revision=self.revision, gguf_file=self.gguf_file, cache_dir=self.cache_dir)

    def load(self, spec: Optional[str], *, progress: Optional[Progress] = None,
             notice: Optional[Progress] = None) -> LoadedModel:
        """`load_model(spec)` with these options; a bad device map or memory budget fails first."""
        device_map = self.device_map if isinstance(self.device_map, dict) else parse_device_map(self.device_map)
        max_memory = self.max_memory if isinstance(self.max_memory, dict) else parse_max_memory(self.max_memory)
        return load_model(spec, revision=self.revision, gguf_file=self.gguf_file, dtype=self.dtype,
                          device=self.device, device_map=device_map, max_memory=max_memory,
                          trust_remote_code=self.trust_remote_code, cache_dir=self.cache_dir,
                          progress=progress, notice=notice)


def load(name_or_path: Optional[str] = None, options: Optional[LoadOptions] = None) -> LoadedModel:
    """A model and its tokenizer in memory, by name (alias, hub id, local directory or .gguf file;
    default: the offline SmolLM2-135M), to give every command function instead of a name: it is
    then never loaded again."""
    return (options or LoadOptions()).load(name_or_path)
