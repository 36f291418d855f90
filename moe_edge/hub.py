"""Where a model comes from: a local folder, the bundled demo, or a Hugging Face id.

A Hugging Face id is looked up in the local hub cache first; only when it is missing there
and the network is allowed is it downloaded (weights as safetensors, never pickles).
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError

DEMO = Path(__file__).parent / "demo" / "deepseek-moe-tiny-gptq"
DEMO_NOTE = ("a tiny base model (6.3M parameters, trained on the Python docs) that continues "
             "text; it does not follow instructions")

# What a checkpoint folder needs; pickled weights (*.bin, *.pt) are never fetched.
_WANTED = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str | None, offline: bool = False, cache_dir: str | Path | None = None) -> Path:
    """The local folder for `spec`: None is the bundled demo; an existing path is itself;
    `org/name` is a Hugging Face id (the hub cache, $HF_HUB_CACHE or `cache_dir`, else a
    download unless `offline`)."""
    if spec is None:
        return DEMO
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{spec}: is a file; give the checkpoint folder (with config.json)")
        return path
    if not _HF_ID.match(spec):
        raise CheckpointError(f"{spec}: no such model folder; give a checkpoint folder, a Hugging "
                              "Face id like deepseek-ai/deepseek-moe-16b-chat, or demo (the "
                              "bundled model: moe-edge chat demo \"your prompt\")")
    return _from_hub(spec, offline, cache_dir)


def _from_hub(repo_id: str, offline: bool, cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_WANTED, cache_dir=cache_dir,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(f"{repo_id}: not in the local Hugging Face cache and --offline "
                                  "forbids downloading; drop --offline or download it first") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_WANTED, cache_dir=cache_dir))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: no such model on the Hugging Face hub (or it is "
                              "private: log in with `hf auth login`)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{repo_id}: download failed ({first}); check the network, or "
                              "give a local folder") from None
