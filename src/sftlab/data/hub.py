"""Hub datasets: a repo's snapshot directory, from the local Hugging Face cache first, else downloaded.

The cache comes first, online or off: `datasets.load_dataset("org/name")` does not read a snapshot that
`huggingface-cli download` put in the cache when the machine is offline, but huggingface_hub finds it.
Every failure says which of offline / not found / gated / unreachable it is, and the fix; none is called
"does not exist", and none waits long: huggingface_hub's own timeouts bound each request, and the cache
lookup makes no request at all, and the first request to the Hub has its own short timeout.
"""

from __future__ import annotations

from pathlib import Path

from sftlab.errors import DataError

DOWNLOAD_HINT = "huggingface-cli download --repo-type dataset {repo}"
REQUEST_TIMEOUT_S = 8.0
"""The first request to the Hub (which tells an unreachable Hub from a missing or gated dataset) waits this long."""


def snapshot(repo: str, *, revision: str | None = None) -> Path:
    """The local directory of Hub dataset `repo` at `revision` (None: main)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    try:
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=revision,
                                                      local_files_only=True))
    except (errors.LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass  # not in the cache
    except errors.HFValidationError as exc:
        raise DataError(f"{repo!r} is not a valid Hub dataset id ({exc}); expected org/name, or a local path that "
                        "exists.", where=repo, reason="invalid hub id") from None
    at = f" at revision {revision}" if revision else ""
    fetch = DOWNLOAD_HINT.format(repo=repo) + (f" --revision {revision}" if revision else "")
    if constants.is_offline_mode():
        raise DataError(f"Hub dataset {repo}{at} is not in the local Hugging Face cache "
                        f"({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set, so it cannot be "
                        f"downloaded. Fetch it on a machine with network (`{fetch}`, then copy the cache), unset "
                        "HF_HUB_OFFLINE, or give a local path.", where=repo, reason="hub offline")
    try:
        # One bounded request first: an unreachable or blackholed Hub fails within the timeout, not after retries.
        info = huggingface_hub.HfApi().repo_info(repo, repo_type="dataset", revision=revision,
                                                 timeout=REQUEST_TIMEOUT_S)
        return Path(huggingface_hub.snapshot_download(repo, repo_type="dataset", revision=info.sha or revision))
    except errors.GatedRepoError:
        raise DataError(f"Hub dataset {repo} is gated: accept its terms at https://huggingface.co/datasets/{repo} and "
                        "log in (`huggingface-cli login` or HF_TOKEN).", where=repo, reason="hub gated") from None
    except errors.RepositoryNotFoundError:
        raise DataError(f"the Hub has no dataset {repo} you can see: check the id's spelling, or, if it is private, "
                        "log in (`huggingface-cli login` or HF_TOKEN). A local path must exist to be read as one.",
                        where=repo, reason="hub not found") from None
    except errors.RevisionNotFoundError:
        raise DataError(f"Hub dataset {repo} has no revision {revision!r}; set revision to a branch, tag or commit "
                        "it has.", where=repo, reason="hub revision") from None
    except Exception as exc:  # no network, DNS, proxy, timeouts, server errors
        cause = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot reach the Hugging Face Hub to fetch dataset {repo}{at} ({cause}), and it is not in "
                        f"the local cache. Check the network, or fetch it elsewhere (`{fetch}`) and copy the cache, "
                        "or give a local path.", where=repo, reason="hub unreachable") from None
