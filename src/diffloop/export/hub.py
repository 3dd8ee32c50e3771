"""The upload of an export to the Hugging Face hub (``hub.push=true``) and its retry command."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from diffloop.config import HubConfig
from diffloop.errors import DiffloopError


class HubUploadError(DiffloopError, RuntimeError):
    """The upload to the hub failed; the run directory is complete and the message says how to
    retry."""


def retry_command(directory: Path, hub: HubConfig) -> str:
    """The ``hf upload`` command that uploads ``directory`` as ``push_to_hub`` would."""
    private = " --private" if hub.private else ""
    return f"hf upload {hub.model_id} {shlex.quote(str(directory))} . --repo-type model{private}"


def push_to_hub(directory: Path, hub: HubConfig) -> str:
    """create_repo (private by default; exist_ok) + upload_folder of ``directory``; returns the repo
    url. Any failure is one HubUploadError line naming hub.model_id and the retry command; nothing
    on disk is touched."""
    from huggingface_hub import create_repo, upload_folder

    token = os.environ.get(hub.token_env) if hub.token_env else None
    try:
        repo = create_repo(
            hub.model_id, private=hub.private, exist_ok=True, token=token, repo_type="model"
        )
        upload_folder(
            repo_id=repo.repo_id,
            folder_path=str(directory),
            token=token,
            commit_message="diffloop: upload LoRA and model card",
        )
    except Exception as e:  # noqa: BLE001 - network, auth, offline mode: all end the same way
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise HubUploadError(
            f"hub.push: uploading {directory} to hub.model_id={hub.model_id} failed "
            f"({type(e).__name__}: {first}); the run is complete on disk. Retry with: "
            f"{retry_command(directory, hub)}"
        ) from None
    return str(repo)
