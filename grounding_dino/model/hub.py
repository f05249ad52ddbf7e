"""Hugging Face hub access for text encoders and detectors named by id (`org/name`, or `org/name/file.pth`).

Everything goes through huggingface_hub, which reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN
itself: nothing here overrides them. Only the files a model needs are fetched (its config, tokenizer and one set of
weights), not the TF/Flax/ONNX copies a repository often holds too. Every failure names the spec key, the id and
what to change.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# What a BERT-family encoder or a transformers GroundingDino folder needs besides its weights.
CONFIG_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "vocab.json", "merges.txt"]
# One set of weights: safetensors when the repository has them, else the PyTorch pickle (read with weights_only).
SAFETENSORS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
PICKLED = ["pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"]
FILE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin", ".safetensors")

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REPO = re.compile(rf"^{_NAME}/{_NAME}$")
_LEGACY = re.compile(rf"^{_NAME}$")              # canonical ids without an owner, e.g. bert-base-uncased
_FILE = re.compile(rf"^({_NAME}/{_NAME})/(.+)$")


def looks_like_id(value: str, *, allow_file: bool = False, allow_legacy: bool = False) -> bool:
    """Whether `value` (not an existing path) reads as a hub id: org/name, name (allow_legacy) or
    org/name/file.pth (allow_file)."""
    if not isinstance(value, str) or ".." in value or value.startswith(("/", "~", ".")):
        return False
    if _REPO.match(value) and not value.endswith(FILE_SUFFIXES):
        return True
    if allow_legacy and _LEGACY.match(value) and not value.endswith(FILE_SUFFIXES):
        return True
    match = _FILE.match(value)
    return bool(allow_file and match and value.endswith(FILE_SUFFIXES))


def snapshot(repo_id: str, key: str) -> str:
    """The local folder of hub model `repo_id` with its config, tokenizer files and one set of weights."""
    folder = _call(key, repo_id, lambda hub: hub.snapshot_download(repo_id, allow_patterns=CONFIG_FILES + SAFETENSORS))
    if not any((Path(folder) / name).is_file() for name in SAFETENSORS[:2]):
        # No safetensors in the repository (older uploads): the pickled weights instead.
        folder = _call(key, repo_id, lambda hub: hub.snapshot_download(repo_id, allow_patterns=CONFIG_FILES + PICKLED))
    return folder


def file(value: str, key: str) -> str:
    """The local path of one file given as org/name/path/in/repo.pth."""
    repo_id, filename = _FILE.match(value).groups()
    return _call(key, value, lambda hub: hub.hf_hub_download(repo_id, filename))


def _call(key: str, what: str, fetch):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = f"HF_HOME={constants.HF_HOME}" + (f", HF_HUB_CACHE={constants.HF_HUB_CACHE}"
                                              if not constants.HF_HUB_CACHE.startswith(constants.HF_HOME) else "")
    try:
        return fetch(huggingface_hub)
    except GatedRepoError as err:
        raise PermissionError(f"{key} '{what}' is a gated model on {constants.ENDPOINT}: accept its terms on the "
                              f"model page and log in (hf auth login, or set HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(f"{key} '{what}': no such model on {constants.ENDPOINT} (or it is private: log in "
                                f"with hf auth login or set HF_TOKEN); check the id, or give a local file or "
                                f"folder") from err
    except RevisionNotFoundError as err:
        raise FileNotFoundError(f"{key} '{what}': the model has no such revision on {constants.ENDPOINT}") from err
    except LocalEntryNotFoundError as err:
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{key} '{what}' is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: unset HF_HUB_OFFLINE on a machine with internet, or give a local folder"
            ) from err
        raise FileNotFoundError(
            f"{key} '{what}' could not be downloaded from {constants.ENDPOINT} ({_first_line(err)}) and is not in "
            f"the Hugging Face cache ({cache}): check the network (and HF_ENDPOINT), or give a local folder"
        ) from err
    except EntryNotFoundError as err:
        raise FileNotFoundError(f"{key} '{what}': the model on {constants.ENDPOINT} has no such file") from err
    except HfHubHTTPError as err:
        raise OSError(f"{key} '{what}': {constants.ENDPOINT} answered {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    cause: Optional[BaseException] = err.__cause__ or err
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"


def missing(value: str, key: str, what: str) -> FileNotFoundError:
    """The error for a value that is neither an existing path nor a hub id."""
    return FileNotFoundError(f"{key}: {value} does not exist here and is not a Hugging Face model id; give {what}")
