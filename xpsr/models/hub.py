"""Pushing a written model folder to the Hugging Face Hub: one ``upload_folder`` call, shared by
``xpsr export`` (xpsr/apps/export.py) and ``XPSRPipeline.push_to_hub`` (xpsr/inference/diffusers_pipeline.py).
It sits in the models layer so that neither of those imports the other.
"""
from __future__ import annotations

from pathlib import Path

from xpsr.errors import XPSRError


class HubPushError(XPSRError):
    """The folder is written but could not be uploaded; the message says how to upload it later."""


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; a clear error without network or a token."""
    from huggingface_hub import create_repo, upload_folder

    try:
        create_repo(repo_id, exist_ok=True, private=private, token=token)
        info = upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                             commit_message=commit_message or "Upload XPSR model (xpsr export)")
    except Exception as e:  # offline mode, no network, no token, no permission: all end the same way
        raise HubPushError(
            f"could not push {folder} to the Hub repo {repo_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}). "
            f"The folder is complete; upload it later with `hf upload {repo_id} {folder}`") from e
    return str(info)
