"""What every family's loading shares: the error a missing or unreadable weight raises, where
``model.pretrained`` points, and the one look at the Hugging Face hub a hub id gets before anything
loads.

A hub id is probed once (:func:`locate_model`), for every family: in the local hub cache, its
snapshot directory is read like any local directory (the hub is not asked; ``hf download REPO``
updates it); else with HF_HUB_OFFLINE=1 it is refused at once; else ONE request (HEAD of its
model_index.json, no retries, :data:`PROBE_TIMEOUT_S`) either finds it (the loaders then download
it) or is a one-line error naming the cause (the hub cannot be reached, a gated repository, no such
repository, not a diffusers pipeline) and the fix. Without the probe huggingface_hub retries an
unreachable hub for about 30 s (5 retries, backoff 1-8 s) and the libraries then report the file as
missing. The reward models' weights use the same two steps (:func:`cached_snapshot`,
:func:`ask_hub`).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from diffloop.errors import DiffloopError

# train.mixed_precision -> the dtype the frozen weights load in (trainables stay fp32). The trainer
# and every tool that reloads a run (``diffloop eval``, ``diffloop sample``) use it, so they
# sample the same network.
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(DiffloopError, RuntimeError):
    """Weights could not be found or read; the message says what was looked for and how to fix
    it."""


def resolve_pretrained(name: str) -> str:
    """``shapes`` -> the shapes-world weights shipped in the package; anything else unchanged."""
    if name == "shapes":
        from diffloop.shapes.model import SHIPPED_WEIGHTS_DIR

        return str(SHIPPED_WEIGHTS_DIR)
    return name


def looks_local(path: str) -> bool:
    """A path rather than a hub id."""
    return Path(path).is_absolute() or path.startswith(".") or Path(path).exists()


# ------------------------------------------------------------------------------- the hub probe

PROBE_TIMEOUT_S = 5.0
"""How long the one request of :func:`ask_hub` waits (connect, then answer); HF_HUB_ETAG_TIMEOUT,
when set, replaces it. huggingface_hub's own default is 10 s, with 5 retries."""

QUIET_LOGGERS = ("huggingface_hub", "transformers", "diffusers")


class HubUnavailableError(ModelLoadError):
    """A hub id that is not (wholly) in the cache cannot be had from the hub: offline mode, an
    unreachable hub, or the hub's refusal; the message names the cause and the fix."""


@dataclass(frozen=True)
class HubProblem:
    """Why the hub did not give a file: ``kind`` is one of offline, unreachable, gated, no_repo,
    no_revision, no_file, disabled, http; ``message`` says it and its own fix, written to follow
    "... and " in a sentence."""

    kind: str
    message: str


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """Log records below ERROR of huggingface_hub, transformers and diffusers and Python warnings
    are dropped while the hub is probed: the probe's one-line answer says what happened. Only
    for the probe: the loggers' levels are restored after it."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub reads (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The cache's snapshot directory of ``repo_id`` at ``revision`` (default main) when it holds
    ``filename`` (``huggingface_hub.try_to_load_from_cache``, which reads only the disk), else
    None."""
    from huggingface_hub import try_to_load_from_cache

    with quiet_hub():
        try:
            found = try_to_load_from_cache(repo_id, filename, revision=revision)
        except (ValueError, OSError):  # not a valid repo id or file name: not cached
            return None
    if not isinstance(found, str):  # None, or the cached fact that the file does not exist
        return None
    return Path(found).parents[len(Path(filename).parts) - 1]


def probe_timeout() -> float:
    """:data:`PROBE_TIMEOUT_S`, or HF_HUB_ETAG_TIMEOUT (seconds) when it is set."""
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or PROBE_TIMEOUT_S)
    except ValueError:
        return PROBE_TIMEOUT_S


def _no_answer_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a request that got no answer: OSError (sockets, requests) and the request
    errors of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    found: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(module).RequestError)
    return tuple(found)


def ask_hub(repo_id: str, filename: str, revision: str | None = None) -> HubProblem | None:
    """None when the hub has ``filename`` in ``repo_id`` (at ``revision``), else why not. Offline
    mode answers without a request; otherwise exactly one HEAD request to HF_ENDPOINT, no retries,
    :func:`probe_timeout` seconds at most, nothing logged or warned on the way."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hub

    endpoint = constants.ENDPOINT
    if constants.HF_HUB_OFFLINE:
        return HubProblem(
            "offline",
            "offline mode is on (HF_HUB_OFFLINE=1), so nothing is downloaded: set HF_HUB_OFFLINE=0 "
            "on a machine that reaches the hub",
        )
    timeout = probe_timeout()
    kwargs: dict[str, object] = {"timeout": timeout}
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False  # said, whatever the installed version's default
    login = "log in (`hf auth login`, or set HF_TOKEN)"
    url = endpoint
    with quiet_hub():
        try:
            url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
            get_hf_file_metadata(url, **kwargs)
        except hub.GatedRepoError:
            return HubProblem(
                "gated",
                f"it is a gated repository on {endpoint} that this machine may not read: accept "
                f"its license at {endpoint}/{repo_id} and {login}",
            )
        except hub.RepositoryNotFoundError as e:
            # The hub answers 401 both for a missing repository and for a private or gated one
            # asked without a login; 404 only for a missing one.
            status = getattr(getattr(e, "response", None), "status_code", None)
            hidden = (
                f", or it is private or gated and this machine is not logged in: {login}"
                if status == 401
                else ""
            )
            return HubProblem("no_repo", f"{endpoint} has no repository '{repo_id}'{hidden}")
        except hub.RevisionNotFoundError:
            return HubProblem("no_revision", f"'{repo_id}' has no revision '{revision}'")
        except hub.EntryNotFoundError:
            return HubProblem("no_file", f"'{repo_id}' has no file {filename}")
        except hub.DisabledRepoError:
            return HubProblem("disabled", f"'{repo_id}' is disabled on {endpoint}")
        except hub.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", "?")
            said = (str(e).strip().splitlines() or [""])[0][:200]
            return HubProblem(
                "http", f"{endpoint} answered HTTP {status} ({said}): try again later"
            )
        except hub.HFValidationError as e:
            return HubProblem("no_repo", f"'{repo_id}' is not a hub repository id ({e})")
        except _no_answer_errors() as e:
            timed_out = isinstance(e, TimeoutError) or "Timeout" in type(e).__name__
            said = (str(e).strip().splitlines() or [""])[0][:200]
            cause = (
                f"no answer within {timeout:g} s" if timed_out else f"{type(e).__name__}: {said}"
            )
            host = "{0.scheme}://{0.netloc}".format(urlsplit(url))  # the one asked
            return HubProblem(
                "unreachable",
                f"the hub cannot be reached: cannot reach {host} ({cause}); connect this "
                "machine to the network (a proxy: HTTPS_PROXY; a mirror: HF_ENDPOINT)",
            )
    return None


def locate_model(
    pretrained: str,
    revision: str | None = None,
    *,
    filename: str = "model_index.json",
    field: str = "model.pretrained",
    what: str = "a diffusers pipeline",
    missing: Callable[[Path], list[str]] | None = None,
) -> str:
    """Where ``pretrained``'s files are read: a local path as given (``shapes``: the shipped
    model); a hub id's snapshot directory when the cache holds its ``filename`` and ``missing``
    (snapshot -> the folders it lacks, e.g. "unet/") names none; else, once :func:`ask_hub` found
    it, the hub id (the loaders download it). Otherwise raises :class:`HubUnavailableError` naming
    the cause and the fix. ``field``/``what`` name the setting and what it must be, in messages."""
    path = resolve_pretrained(pretrained)
    if looks_local(path):
        return path
    snapshot = cached_snapshot(path, filename, revision)
    lacks = missing(snapshot) if snapshot is not None and missing is not None else []
    if snapshot is not None and not lacks:
        return str(snapshot)
    problem = ask_hub(path, filename, revision)
    if problem is None:
        return path
    if snapshot is not None:
        where = f"is only partly in the Hugging Face cache ({snapshot} lacks {', '.join(lacks)})"
    else:
        where = f"is not in the Hugging Face cache ({hub_cache_dir()})"
    at = f" at revision '{revision}'" if revision else ""
    name = f"{field}='{pretrained}'{at}"
    fix = (
        f"`hf download {path}{f' --revision {revision}' * bool(revision)} --local-dir DIR` "
        f"where the hub is reachable, then {field}=DIR"
    )
    if problem.kind == "no_file":
        message = (
            f"{name}: the hub repository has no {filename}, so it is not {what}; give {what} "
            "(a hub id or a local directory)"
        )
    elif problem.kind == "no_repo":
        message = (
            f"{name}: {problem.message}; no local directory of that name exists either: give "
            f"{what} (a hub id or a local directory)"
        )
    elif problem.kind == "no_revision":
        message = f"{name}: {problem.message}; give one of its branches, tags or commits"
    else:
        message = f"{name} {where} and {problem.message}; or download it: {fix}"
    raise HubUnavailableError(message)
