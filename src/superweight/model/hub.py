"""The Hugging Face hub as a model's home: whether we are offline, whether the hub can be reached,
the options every `from_pretrained` call of a model gets, what a failed one means to the user, and
THE one reader of a model's config (every command reads it here, so all fail the same way).
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any, Callable

from .source import ModelSource, aliases, close_alias
from ..errors import ModelLoadError, first_line

Progress = Callable[[str], None]
HUB_PROBE_SECONDS = 3.0  # how long to wait for the hub (or proxy) to take a connection before calling it unreachable
_TRUE = ("1", "ON", "YES", "TRUE")  # huggingface_hub's spelling of a true environment variable


def hub_offline() -> bool:
    """Whether nothing may be downloaded: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now, or set when
    huggingface_hub was imported (it reads them once, then refuses downloads whatever the
    environment says later)."""
    from huggingface_hub import constants

    now = any(os.environ.get(name, "").strip().upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return now or constants.is_offline_mode()


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub endpoint (or the proxy in front of it) takes a TCP connection within `timeout`
    seconds; the name lookup runs in a thread, as it can hang far longer than that without a network."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = getproxies().get(endpoint.scheme)
    if proxy and not proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname, proxy_url.port or 80
    answer: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except (OSError, ValueError):
            answer.append(False)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(answer and answer[0])


def hub_access(source: ModelSource, notice: Progress) -> dict[str, Any]:
    """Extra from_pretrained (or snapshot_download) options for a hub model when the hub cannot be
    reached and we are not offline: huggingface_hub would retry for ~30 s before using the cache or
    failing. A cached copy is then read without asking the hub; without one, fail now. A local
    directory needs no hub."""
    if source.kind != "hub" or hub_offline() or hub_reachable():
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source.location, "config.json", cache_dir=source.cache_dir,
                                         revision=source.revision), str):
        notice(f"{constants.ENDPOINT} is not reachable: using the cached copy of {source.location}")
        return {"local_files_only": True}
    if not source.alias:  # what the user typed may not have been meant as a hub id at all
        typo_of = close_alias(source.spec)
        hint = f" (did you mean {typo_of}?)" if typo_of else ""
        raise ModelLoadError(
            f"'{source.spec}' is not a model alias{hint} or a local path, and not a reachable hub id: "
            f"{constants.ENDPOINT} cannot be reached and it is not in the local cache; check the name, "
            "connect to the network, or give a local directory or .gguf file"
        )
    raise ModelLoadError(
        f"cannot reach {constants.ENDPOINT} to download {source.location} (alias '{source.alias}'), and it is not "
        "in the local cache; connect to the network, or set HF_HUB_OFFLINE=1 to use cached models only, or give "
        "a local directory or .gguf file"
    )


def hub_options(source: ModelSource, trust_remote_code: bool, notice: Progress) -> dict[str, Any]:
    """The options of every from_pretrained call for `source` (a hub model or a local directory)."""
    return dict(revision=source.revision, cache_dir=source.cache_dir, trust_remote_code=trust_remote_code,
                **hub_access(source, notice))


def model_load_error(source: ModelSource, error: Exception) -> ModelLoadError:
    """What a failed from_pretrained (OSError, ValueError) of `source` means, in one line that says what to do."""
    text = first_line(error) or type(error).__name__
    if source.kind == "hub":
        offline = hub_offline()
        hint = " (offline: HF_HUB_OFFLINE is set)" if offline else ""
        if source.alias and offline:
            return ModelLoadError(
                f"alias '{source.alias}' maps to the hub model {source.location}, which is not in the local cache{hint}; "
                "unset HF_HUB_OFFLINE to download it, or give a local directory or .gguf file"
            )
        if source.alias:
            return ModelLoadError(
                f"alias '{source.alias}' maps to the hub model {source.location}, which is not in the local cache and "
                f"could not be downloaded ({text}); check your access to it, or give a local directory or .gguf file"
            )
        typo_of = close_alias(source.spec)
        known = f"did you mean {typo_of}?" if typo_of else ", ".join(sorted(aliases()))
        return ModelLoadError(
            f"cannot load '{source.spec}'{hint}: not a known alias ({known}), a local directory, a .gguf file, "
            f"or a hub model in the cache; check the name or go online"
        )
    return ModelLoadError(f"cannot load {source.location}: {text}")


def hub_gguf(repo_id: str, filename: str, revision: str | None, cache_dir: str | None) -> str:
    """The local path of `filename` of the hub repository `repo_id` (`--gguf-file` of a hub id, as
    `from_pretrained(repo_id, gguf_file=...)` takes it): downloaded once into the hub cache, read
    from there offline."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, \
        RevisionNotFoundError

    where = f"{filename} of the hub model {repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except LocalEntryNotFoundError:  # offline, or the hub unreachable, and no cached copy
        hint = " (offline: HF_HUB_OFFLINE is set)" if hub_offline() else f" ({constants.ENDPOINT} cannot be reached)"
        raise ModelLoadError(f"{where} is not in the local hub cache{hint}; download it online once, or give a "
                             "local .gguf file") from None
    except EntryNotFoundError:
        raise ModelLoadError(f"{repo_id} has no file {filename}; check --gguf-file against the repository's "
                             "file list") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise ModelLoadError(f"cannot download {where}: {type(error).__name__}; check MODEL, --revision and "
                             "your access to the repository") from None
    except OSError as error:
        raise ModelLoadError(f"cannot download {where}: {first_line(error) or repr(error)}; "
                             "check the network and the disk") from None


def check_supported_config(config: Any) -> None:
    """Refuse, before any weight loads, a config superweight cannot work with (a model type the
    adapter table lacks is looked at on a weightless model: see adapters.adapter_for_config)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    from .adapters import adapter_for_config  # here, not on top: the offline check must not import torch

    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(
            f"model type '{config.model_type}' is not a causal language model; superweight needs a decoder LM "
            "(AutoModelForCausalLM)"
        )
    adapter_for_config(config)


def read_config(source: ModelSource, location: str | Path, options: dict[str, Any]) -> Any:
    """The config of `source`, read from `location` (its hub id or directory, a hub snapshot, or
    the dequantised GGUF cache) with from_pretrained `options` (`hub_options` for a hub model or
    local directory); a config that cannot be read, or that superweight cannot work with, fails
    here with a `ModelLoadError` that says what to do."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location, **options)
    except (OSError, ValueError) as e:
        raise model_load_error(source, e) from None
    except (StrictDataclassError, TypeError) as e:  # a field of the wrong type ("hidden_size": "abc")
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise ModelLoadError(f"the config.json of {source.spec} does not describe a model transformers can build "
                             f"({why}); fix that field, or download or copy the model again") from None
    check_supported_config(config)
    return config


def read_tokenizer(source: ModelSource, location: str | Path, options: dict[str, Any]) -> Any:
    """The tokenizer of `source`, read from `location` with from_pretrained `options`. A hub model's
    failure is told as the hub's (`model_load_error`); a folder whose tokenizer is missing or
    unreadable is named as such (transformers says only "Couldn't instantiate the backend
    tokenizer", or shows a bare JSON error without the file)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, **options)
    except (OSError, ValueError, TypeError, KeyError) as e:
        if source.kind == "hub" and isinstance(e, (OSError, ValueError)) and str(location) == source.location:
            raise model_load_error(source, e) from None
        why = first_line(e).rstrip(": ") or type(e).__name__
        raise ModelLoadError(
            f"cannot read the tokenizer of {source.spec if source.kind == 'hub' else location} ({why}); a model "
            "folder needs its tokenizer files (tokenizer.json or tokenizer.model, with tokenizer_config.json): "
            "copy them from the original model"
        ) from None
