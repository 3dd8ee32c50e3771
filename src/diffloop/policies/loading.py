"""What every family's loading shares: where ``model.pretrained`` points, its model_index.json
(read once), every component loaded and named from the family's table (:class:`Component`,
:func:`load_components`), the error a missing or unreadable weight raises, and the one look at the
Hugging Face hub a hub id gets before anything loads.

A family's components are a table (``families.FAMILIES``): folder name, class, whether it may be
absent, and a ``model.*`` field that may name another source for it. :func:`load_components` reads
the table for every family: it checks a local directory for the folders the table requires (one
message naming every missing folder and what ``model.pretrained`` must be), loads each component
with its class's ``from_pretrained`` (or the policy's own loader for it), and names the component,
the folder and the fix when one cannot be read.

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
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from diffloop.config import ModelConfig
from diffloop.errors import DiffloopError
from diffloop.policies.quantization import quantized_names

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


# ------------------------------------------------------------------------- a family's components


@dataclass(frozen=True)
class Component:
    """One component of a family's diffusers layout: its folder (also the policy attribute and the
    pipeline's keyword), and how it loads."""

    name: str
    cls: str
    """``module.Class`` whose ``from_pretrained(path, subfolder=name)`` loads it (imported only
    then), e.g. ``diffusers.UNet2DConditionModel``, ``transformers.AutoTokenizer``."""
    note: str = ""
    """What it is, in messages (``CLIP-L``)."""
    optional: str = ""
    """Non-empty: the component may be absent (listed as [null, null] in model_index.json, or, in
    a local directory without one, no folder); components with the same value come together (SD3's
    T5 encoder and its tokenizer: "T5")."""
    override: str = ""
    """A dotted ``ModelConfig`` field (``sdxl.vae``) that, when set, names where the component is
    read instead: a hub id or directory holding its config.json, or a pipeline holding its
    folder."""
    missing_note: str = ""
    """Said when the folder is missing (what a directory without it usually is)."""

    @property
    def has_weights(self) -> bool:
        """A model with weights (loaded in ``model.variant``), not a tokenizer or a scheduler."""
        return not self.name.startswith(("tokenizer", "scheduler"))

    def load_class(self) -> Any:
        """The class ``cls`` names (its module imported now)."""
        module, name = self.cls.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    def override_value(self, model: ModelConfig) -> str | None:
        """The ``model.<override>`` value, or None."""
        value: Any = model
        for part in self.override.split(".") if self.override else []:
            value = getattr(value, part, None)
        return value if self.override and value else None


@dataclass(frozen=True)
class ModelFiles:
    """Where ``pretrained``'s files are read (a local directory, a cached snapshot, or a hub id the
    loaders download) and its model_index.json (None: a local directory without one), read
    once."""

    pretrained: str
    path: str
    index: dict[str, Any] | None

    @property
    def local(self) -> Path | None:
        return Path(self.path) if looks_local(self.path) else None


def listed(index: dict[str, Any] | None, name: str) -> bool:
    """model_index.json lists component ``name`` with a class (not [null, null] or absent)."""
    return index is not None and (index.get(name) or [None])[0] is not None


def read_model_index(path: str, pretrained: str, revision: str | None = None) -> dict | None:
    """model_index.json at ``path`` (``locate_model``'s answer for ``pretrained``): a local
    directory's (None when it has none: the family's loader then names what is missing), or a hub
    id's, downloaded once the hub answered. Unreadable: a one-line ModelLoadError."""
    if looks_local(path):
        index = Path(path) / "model_index.json"
        if not index.is_file():
            return None
        try:
            return dict(json.loads(index.read_text()))
        except (ValueError, TypeError, OSError) as e:
            raise ModelLoadError(
                f"model.pretrained='{pretrained}': {index} is not a readable JSON mapping "
                f"({type(e).__name__}: {e}); restore it from the model's source"
            ) from None
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except Exception as e:  # any failure: re-raised with the how-to, for every family
        raise ModelLoadError(
            f"could not read model_index.json of model.pretrained='{pretrained}': "
            f"{type(e).__name__}: {e}\nGive a local directory in diffusers layout or a hub id that "
            "is already in the Hugging Face cache (`hf download <repo>`; HF_HUB_OFFLINE=1 forbids "
            "downloads)."
        ) from e


def present(c: Component, files: ModelFiles) -> bool:
    """Whether the loader reads component ``c``: always when required; an optional one when
    model_index.json lists it, or, without an index, when its folder exists."""
    if not c.optional:
        return True
    if files.index is not None:
        return listed(files.index, c.name)
    return files.local is not None and (files.local / c.name).is_dir()


def from_pretrained(
    c: Component, path: str, model: ModelConfig, quantized: QuantizedLoad | None = None
) -> Any:
    """The default loader: ``c.cls.from_pretrained(path, subfolder=c.name)`` at model.revision (and
    model.variant for weights); with ``quantized``, through ``model.quantization``'s backend
    (``quantization.load_kwargs``: its ``quantization_config``, the weight dtype, the device)."""
    kwargs = {"variant": model.variant} if c.has_weights else {}
    if quantized is not None:
        from diffloop.policies.quantization import load_kwargs

        kwargs |= load_kwargs(c.cls, model.quantization, quantized.dtype, quantized.device)
    return c.load_class().from_pretrained(path, subfolder=c.name, revision=model.revision, **kwargs)


@dataclass(frozen=True)
class QuantizedLoad:
    """How the components ``model.quantization`` lists load: the dtype of their unquantized
    parts (the policy's weight dtype) and the device they quantize on."""

    dtype: torch.dtype
    device: torch.device | str = "cpu"


def from_override(c: Component, source: str) -> Any:
    """Component ``c`` from ``model.<c.override>`` = ``source``: a hub id (its cached snapshot, or
    the id once the hub answered; one line if it cannot) or a directory, holding the component's
    config.json at its root or in a ``c.name`` folder (a whole pipeline)."""
    field = f"model.{c.override}"
    where = locate_model(source, filename="config.json", field=field, what=f"a diffusers {c.name}")
    subfolder = c.name if (Path(where) / c.name).is_dir() else None
    return c.load_class().from_pretrained(where, subfolder=subfolder)


Loader = Callable[[Component, str, ModelConfig], Any]


def load_components(
    model: ModelConfig,
    table: Sequence[Component],
    files: ModelFiles,
    how_to_provide: str,
    load: Loader = from_pretrained,
    quantized: QuantizedLoad | None = None,
) -> dict[str, Any]:
    """{name: component} of every row of ``table`` for ``model`` (None for an absent optional
    one), each by ``load(component, files.path, model)`` or from its override; the ones
    ``model.quantization`` quantizes by :func:`from_pretrained` with ``quantized`` (the family's
    own loader hooks are for schedulers and settings, never for these).

    A local directory must exist and hold the folder of every component read (not overridden);
    else one ModelLoadError names every missing folder (with how to run without an optional one)
    and ends with ``how_to_provide``, as does any failure to load one."""
    local = files.local
    if local is not None and not local.is_dir():
        raise ModelLoadError(f"no directory at '{files.path}'. {how_to_provide}")
    wanted = [c for c in table if present(c, files)]
    missing = [
        c
        for c in wanted
        if local is not None and not c.override_value(model) and not (local / c.name).is_dir()
    ]
    if missing:
        optional = [c.name for c in missing if c.optional]
        notes = [f" ({c.missing_note})" for c in missing if c.missing_note]
        if optional:
            notes.append(
                f" ({', '.join(optional)} is optional: write it as [null, null] in "
                "model_index.json to run without it)"
            )
        raise ModelLoadError(
            f"'{files.path}' lacks the component folder(s) "
            f"{', '.join(c.name + '/' for c in missing)}{''.join(notes)}. {how_to_provide}"
        )
    for group in {c.optional for c in table if c.optional}:
        members = [c for c in table if c.optional == group]
        if 0 < sum(c in wanted for c in members) < len(members):
            names = " and ".join(c.name for c in members)
            raise ModelLoadError(
                f"{names} ({group}) come together: give both or neither. {how_to_provide}"
            )
    components: dict[str, Any] = {c.name: None for c in table if c not in wanted}
    quantize = quantized_names(model.quantization, [c.name for c in table])
    for c in wanted:
        source = c.override_value(model)
        where = f"'{source}' (model.{c.override})" if source else f"'{files.path}', {c.name}/"
        try:
            if source:
                components[c.name] = from_override(c, source)
            elif c.name in quantize:
                how = quantized or QuantizedLoad(torch.float32)
                components[c.name] = from_pretrained(c, files.path, model, how)
            else:
                components[c.name] = load(c, files.path, model)
        except HubUnavailableError:  # an override's hub id: already one line with the fix
            raise
        except Exception as e:  # every loader failure gets the same how-to
            raise ModelLoadError(
                f"could not load the {c.name} of model.pretrained='{files.pretrained}' (looked "
                f"in {where}): {type(e).__name__}: {e}\n{how_to_provide}"
            ) from e
    return components
