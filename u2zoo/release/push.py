"""``u2zoo publish --push DEST``: copy a finished release to a local or mounted folder, or upload
it to a Hugging Face Hub model repo (``hf://OWNER/REPO``). Before any request the card must
parse as a Hugging Face ``ModelCard`` and every file of ``SHA256SUMS`` must be there; a missing
token, package or network is one line naming what is missing."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from u2zoo.errors import BackendUnavailable, ConfigError, one_line
from u2zoo.files import folder_built_in_place
from u2zoo.release.bundle import sha256sums

HUB_PREFIX = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def release_files(release: Path) -> list[str]:
    """The files ``SHA256SUMS`` lists, each checked to exist with that hash."""
    sums_file = release / "SHA256SUMS"
    if not sums_file.is_file():
        raise ConfigError(f"{release} is not a u2zoo release: no SHA256SUMS")
    expected = sums_file.read_text(encoding="utf-8")
    actual, files = sha256sums(release)
    if actual != expected:
        listed = dict(line.split("  ", 1)[::-1] for line in expected.splitlines() if "  " in line)
        have = dict(line.split("  ", 1)[::-1] for line in actual.splitlines())
        wrong = sorted(set(listed.items()) ^ set(have.items()))
        raise ConfigError(f"{release}: files differ from SHA256SUMS: {wrong[0][0]} (of {len(wrong)} difference(s))")
    return files + ["SHA256SUMS"]


def check_card(release: Path):
    """The card as ``huggingface_hub`` reads it (what the Hub will show)."""
    try:
        from huggingface_hub import ModelCard
    except ImportError:
        raise BackendUnavailable("pushing to the Hugging Face Hub needs huggingface_hub: pip install 'u2zoo[publish]'")
    try:
        return ModelCard((release / "README.md").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{release}/README.md is not a valid model card: {one_line(exc)}") from None


def push(release: Path, dest: str, force: bool = False) -> str:
    """Push ``release`` to ``dest``; returns where it went."""
    files = release_files(release)
    if dest.startswith(HUB_PREFIX):
        return push_to_hub(release, dest[len(HUB_PREFIX) :], files)
    return push_to_folder(release, Path(dest), force)


def push_to_folder(release: Path, dest: Path, force: bool) -> str:
    """Copy into a sibling temp folder, then rename: a reader never sees half a release."""
    with folder_built_in_place(dest, force, "--push ") as staging:
        shutil.copytree(release, staging, dirs_exist_ok=True)
    return str(dest)


def hub_token() -> str | None:
    """``HF_TOKEN`` or the token ``hf auth login`` stored, as huggingface_hub finds them."""
    from huggingface_hub import get_token

    return get_token()


def push_to_hub(release: Path, repo: str, files: list[str]) -> str:
    """Upload the release as one commit to a model repo (created if needed)."""
    repo_id, _, revision = repo.partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise ConfigError(f"--push {HUB_PREFIX}{repo}: expected {HUB_PREFIX}OWNER/REPO[@REVISION]")
    check_card(release)
    token = hub_token()
    if not token:
        raise ConfigError(
            f"--push {HUB_PREFIX}{repo_id}: no Hugging Face token: set HF_TOKEN or run `hf auth login` "
            f"(the release is ready in {release}: {len(files)} files)"
        )
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=release,
            repo_type="model",
            revision=revision or None,
            allow_patterns=files,
            commit_message=f"u2zoo publish: {len(files)} files",
        )
    except Exception as exc:  # noqa: BLE001 - network, auth and hub errors all end in one line
        raise ConfigError(f"--push {HUB_PREFIX}{repo_id}: the upload failed: {one_line(exc)}") from None
    return str(getattr(info, "commit_url", f"https://huggingface.co/{repo_id}"))
