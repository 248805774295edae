"""Uploading an export to the Hugging Face hub: the start-up checks, what to push, and the push.

A push happens at the end of a fit, after hours of training, so everything that can be known before
(a malformed repo id, no token, a token the hub rejects or that may not write there, a hub that cannot
be reached) is checked when the fit starts: :func:`check_hub_access` raises a
:class:`~ipo_lightning.errors.ConfigError`, which the CLI turns into one line and exit code 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, validate_repo_id

from ipo_lightning.errors import ConfigError, UserInputError

OPTION = "export.push_to_hub"


class HubPushError(UserInputError):
    """The upload at the end of a fit failed; the export is on disk and the message says how to retry."""


@dataclass(frozen=True)
class PushPlan:
    """What :func:`push_export` uploads: the export folder, to which repo, how visible, and the commit."""

    repo_id: str
    folder: Path
    private: bool
    commit_message: str


def check_repo_id(repo_id: str) -> None:
    """Raise a ConfigError naming the option when ``repo_id`` is not a hub model id (``[user/]name``)."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ConfigError(f"{OPTION}={repo_id!r} is not a hub repo id: {error}") from None


def check_hub_access(repo_id: str, token: str | None = None, endpoint: str | None = None) -> None:
    """Check at start-up that ``repo_id`` is well formed, a token is set, the hub accepts it and it
    may write there (not a read token; a fine-grained one with ``repo.write`` on the namespace).

    Args:
        repo_id: the ``--export.push_to_hub`` value.
        token: the token to check; default: ``huggingface_hub.get_token()`` (HF_TOKEN or the login's).
        endpoint: the hub to ask; default: ``$HF_ENDPOINT`` or huggingface.co.

    Raises:
        ConfigError: one line saying what is missing and how to fix it.
    """
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint)
    token = token or get_token()
    if token is None:
        raise ConfigError(
            f"{OPTION}={repo_id}: no Hugging Face token; log in with `hf auth login` or set HF_TOKEN"
        )
    try:
        identity = api.whoami(token=token)
    except OfflineModeIsEnabled:
        raise ConfigError(f"{OPTION}={repo_id}: the hub is needed, but HF_HUB_OFFLINE is set") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        problem = (
            "rejected the token (HF_TOKEN or `hf auth login`)" if status == 401 else f"answered {status}"
        )
        raise ConfigError(f"{OPTION}={repo_id}: {api.endpoint} {problem}") from None
    except Exception as error:  # the HTTP client's connection errors differ by version
        raise ConfigError(
            f"{OPTION}={repo_id}: cannot reach {api.endpoint} ({type(error).__name__}: {error})"
        ) from None
    access = (identity.get("auth") or {}).get("accessToken") or {}
    role = access.get("role")
    if role == "read":
        raise ConfigError(f"{OPTION}={repo_id}: the Hugging Face token is read-only; use a write token")
    scopes = access.get("fineGrained")
    if role == "fineGrained" and isinstance(scopes, dict):  # without its scopes there is nothing to judge
        namespace = repo_id.split("/")[0] if "/" in repo_id else str(identity.get("name", ""))
        # A repo id without a namespace is created under the token's user: the hub names it in full.
        full_id = repo_id if "/" in repo_id else f"{namespace}/{repo_id}"
        if not fine_grained_can_write(scopes, full_id, namespace):
            raise ConfigError(
                f"{OPTION}={repo_id}: the fine-grained Hugging Face token may not write to {namespace!r} "
                f"(it needs the repo.write permission on that user or organisation, or on {repo_id}); "
                "add it to the token or use a write token"
            )


def fine_grained_can_write(scopes: dict[str, Any], repo_id: str, namespace: str) -> bool:
    """Whether a fine-grained token's scopes (``auth.accessToken.fineGrained`` of the hub's whoami
    answer) let it create and write ``repo_id`` in ``namespace``.

    The hub lists the token's permissions in ``global`` (account-wide) and in ``scoped``: entries
    ``{"entity": {"type": "user" | "org" | "model" | ..., "name": ...}, "permissions": [...]}``, a
    user or organisation by its name, one repo by ``namespace/name``. Writing a model repo takes
    ``repo.write`` on its namespace or on the repo itself.
    """
    if "repo.write" in (scopes.get("global") or []):
        return True
    for scope in scopes.get("scoped") or []:
        entity = scope.get("entity") or {}
        if "repo.write" not in (scope.get("permissions") or []):
            continue
        kind, name = entity.get("type"), entity.get("name")
        if (kind in ("user", "org") and name == namespace) or (kind == "model" and name == repo_id):
            return True
    return False


def push_plan(folder: Path, repo_id: str, private: bool, global_step: int) -> PushPlan:
    """The upload of export ``folder`` to ``repo_id`` (created ``private`` if it does not exist)."""
    return PushPlan(
        repo_id=repo_id,
        folder=folder,
        private=private,
        commit_message=f"ipo-lightning export after {global_step} optimizer steps",
    )


def push_export(plan: PushPlan, api: HfApi | None = None) -> str:
    """Create the repo if needed and upload the export folder; the commit's URL.

    An existing repo keeps its visibility (``private`` applies to a new one only).

    Raises:
        HubPushError: the upload failed; the message names the folder and the command to retry.
    """
    api = api or HfApi()
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=plan.repo_id, folder_path=str(plan.folder), commit_message=plan.commit_message
        )
    except Exception as error:  # one line for any failure; the export stays on disk
        raise HubPushError(
            f"{OPTION}={plan.repo_id}: upload failed ({type(error).__name__}: {error}); the export is in "
            f"{plan.folder}; retry with `hf upload {plan.repo_id} {plan.folder} .`"
        ) from error
    return str(commit.commit_url)
