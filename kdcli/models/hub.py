"""Where a model reference points: a local file or folder, a Hugging Face Hub repo, a timm pretrained tag, or a
bare architecture name.

Hub repos and pretrained tags are fetched with huggingface_hub into its cache (HF_HOME / HF_HUB_CACHE), which
also serves them without a network (HF_HUB_OFFLINE=1). Nothing is fetched unless the reference names the Hub
(`hf-hub:ORG/NAME[@REVISION]`, `timm/ARCH.TAG`) or a pretrained tag (`ARCH.TAG`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import timm
from timm.models import get_pretrained_cfg

from kdcli import __version__
from kdcli.errors import KdcliError, close_matches

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
# The weights files of a timm Hub repo, in the order timm's own Hub loader prefers them.
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pkl", ".tar")


@dataclass(frozen=True)
class Reference:
    """A model reference as the user wrote it, and what it names."""

    text: str
    kind: str  # "path", "hub" (a Hub repo id), "pretrained" (ARCH.TAG) or "arch"
    name: str  # the path, the repo id (with @revision), ARCH.TAG or the architecture


def parse_reference(text: str) -> Reference:
    """Tell what a reference names, without touching the network or loading anything."""
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            return Reference(text, "hub", text[len(prefix):])
    if Path(text).exists() or text.endswith(WEIGHT_SUFFIXES) or "\\" in text:
        return Reference(text, "path", text)
    if text.startswith("timm/") and text.count("/") == 1:  # timm's own Hub repos, as timm names them
        return Reference(text, "hub", text)
    if "/" in text:
        return Reference(text, "path", text)
    if "." in text and timm.is_model(text.partition(".")[0]):
        return Reference(text, "pretrained", text)
    return Reference(text, "arch", text)


def check_arch(arch: str, flag: str) -> None:
    if not timm.is_model(arch.partition(".")[0]):
        hint = close_matches(arch, timm.list_models(), n=4)
        raise KdcliError(f"unknown timm architecture '{arch}'{hint}; see timm.list_models() ({flag})")


def pretrained_cfg_of(name: str, flag: str):
    """timm's registry config of a pretrained tag ARCH.TAG (a clear line when the tag does not exist)."""
    check_arch(name, flag)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None or not cfg.has_weights:
        arch = name.partition(".")[0]
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        known = f"its tags: {', '.join(tags[:6])}{', ...' if len(tags) > 6 else ''}" if tags else "it has none"
        raise KdcliError(f"{name}: timm has no pretrained weights under that tag ({known}); pass {flag} ARCH.TAG")
    return cfg


def fetch_repo(repo: str, role: str) -> Path:
    """The local snapshot folder of a Hub repo holding config.json and a weights file, from the cache or the Hub."""
    repo_id, _, revision = repo.partition("@")
    config = Path(_download(repo_id, "config.json", revision or None, role))
    _download_first(repo_id, HUB_WEIGHTS, revision or None, role)
    return config.parent


def fetch_pretrained_weights(name: str, cfg, role: str) -> Path:
    """The weights file of a timm pretrained tag, from its Hub repo (through the cache)."""
    if not cfg.hf_hub_id:
        raise KdcliError(
            f"{role} {name}: timm hosts these weights at {cfg.url}, not on the Hugging Face Hub, and kdcli fetches "
            "from the Hub only; download the file yourself and pass it through 'kdcli convert'"
        )
    repo_id, _, revision = cfg.hf_hub_id.partition("@")
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_WEIGHTS
    return Path(_download_first(repo_id, names, revision or None, role))


def _download_first(repo_id: str, filenames: tuple[str, ...], revision: str | None, role: str) -> str:
    from huggingface_hub.errors import EntryNotFoundError

    first_error = None
    for filename in filenames:
        try:
            return _download(repo_id, filename, revision, role, missing_ok=True)
        except EntryNotFoundError as err:  # not in the repo, or (offline) not in the cache: try the next one
            first_error = first_error or err
    raise _hub_error(first_error, repo_id, " or ".join(filenames), role)


def _download(repo_id: str, filename: str, revision: str | None, role: str, missing_ok: bool = False) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retry warnings would break the one error line that ends a failure
    try:
        return hf_hub_download(repo_id, filename, revision=revision, library_name="kdcli",
                               library_version=__version__)
    except EntryNotFoundError as err:
        if missing_ok:
            raise
        raise _hub_error(err, repo_id, filename, role) from err
    except Exception as err:  # network, authorisation, bad ids: all mean "cannot get this model"
        raise _hub_error(err, repo_id, filename, role) from err
    finally:
        hub_log.setLevel(level)


def _hub_error(err: Exception | None, repo_id: str, filename: str, role: str) -> KdcliError:
    """One line saying why a Hub file cannot be had, and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{role} hf-hub:{repo_id}"
    if isinstance(err, HFValidationError):
        return KdcliError(f"{what}: not a valid Hub repo id ({_first_line(err)}); write hf-hub:ORG/NAME")
    if isinstance(err, GatedRepoError):
        return KdcliError(f"{what} is gated; accept its terms on the Hub and log in (hf auth login), then retry")
    if isinstance(err, RepositoryNotFoundError):
        return KdcliError(f"{what} does not exist on the Hub (or is private: log in with hf auth login)")
    if isinstance(err, RevisionNotFoundError):
        return KdcliError(f"{what}: no such revision; pass hf-hub:ORG/NAME@REVISION with an existing one")
    if isinstance(err, LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return KdcliError(
            f"{what}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; run once "
            "with a network to cache it, or point HF_HOME/HF_HUB_CACHE at a cache that holds it"
        )
    if isinstance(err, EntryNotFoundError):
        return KdcliError(f"{what} has no {filename}; kdcli needs a timm model repo (config.json + model.safetensors)")
    return KdcliError(f"{what}: cannot fetch {filename} ({_first_line(err)}); check the network, or set "
                      "HF_HUB_OFFLINE=1 to use the cache only")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
