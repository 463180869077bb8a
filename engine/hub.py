"""The Hugging Face hub: snapshot downloads into its cache (HF_HUB_OFFLINE honoured) with one-sentence errors.

Imports only engine.errors.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from engine.errors import MedkoError

HUB_MODELS = {"4b": "google/medgemma-4b-it", "27b": "google/medgemma-27b-text-it"}


def hub_snapshot(repo_id: str, patterns: Sequence[str], repo_type: str = "dataset",
                 local_hint: str = "or give a local file or directory instead") -> Path:
    """Files of a hub repository in the huggingface-hub cache; HF_HUB_OFFLINE=1 is honoured by the library."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=list(patterns)))
    except GatedRepoError:
        raise MedkoError(f"{repo_id} is gated: accept its terms on its Hugging Face page, then set HF_TOKEN "
                         f"or run `hf auth login`") from None
    except RepositoryNotFoundError:
        raise MedkoError(f"{repo_id} was not found or needs a token: check the name, accept its terms, and "
                         f"set HF_TOKEN") from None
    except LocalEntryNotFoundError as err:
        missing = _missing_files(err)
        if missing:
            raise MedkoError(f"{repo_id} is only partly downloaded: {missing} missing from {err.snapshot_path} "
                             f"and the hub cannot be reached (offline?); finish the download with a network "
                             f"(HF_HUB_OFFLINE unset), {local_hint}") from None
        raise MedkoError(f"{repo_id} is not in the local cache and the hub cannot be reached (offline?); "
                         f"download it once with a network, {local_hint}") from None


def _missing_files(err: Exception) -> str | None:
    """The missing files of an incomplete cached snapshot (huggingface-hub's IncompleteSnapshotError), else None."""
    if getattr(err, "snapshot_path", None) is None:
        return None
    found = re.search(r"(\d+) file\(s\) are missing \((.*?)\)\.", str(err))
    return f"{found.group(1)} file(s) ({found.group(2)})" if found else "some files"


HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


def hub_download(repo_id: str) -> Path:
    """A model checkpoint in the huggingface-hub cache (config, safetensors shards, tokenizer)."""
    return hub_snapshot(repo_id, HUB_PATTERNS, "model", "or pass --model DIR")
