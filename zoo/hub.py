"""The Hugging Face Hub: publish a built entry folder as a model repo, fetch one into the store.

A published repo is the entry folder as ``zoo build`` (and ``zoo export``) wrote it: weights
(safetensors), ``config.json`` with the sha256 of every weight file, ``config.yaml``,
``metrics.json``, any ``export/<format>/`` bundles, and the model card as ``README.md`` with the
Hub's front matter (:func:`zoo.card.render_card`). So a download is checked exactly as a local
build is: :func:`zoo.store.read_config` and :func:`zoo.store.verify` before anything is loaded.

::

    zoo push baseline-resnet18-breastmnist my-org/baseline-resnet18-breastmnist [--revision v1] [--private]
    zoo push baseline-resnet18-breastmnist my-org/x --dry-run out/   # write what would be uploaded, upload nothing
    zoo.load("hf-hub:my-org/baseline-resnet18-breastmnist@v1")      # downloaded once, then read from the store

References: ``hf-hub:<org>/<repo>[@<revision>]`` (a branch, tag or commit; default ``main``).

- A direct reference is fetched into ``<ZOO_HOME>/hf-hub/<org>--<repo>@<revision>/``, once: later
  loads read that folder without the network (a moving branch is pinned at its first download;
  :func:`fetch` with ``refresh=True`` or deleting the folder fetches again).
- A registry entry whose ``weights`` say ``hf-hub:...`` is fetched into its own store folder
  (``<ZOO_HOME>/<name>``) the first time it is loaded, and must hold that entry (its ``config.json``
  entry equal to the registry's).

Downloads go through ``huggingface_hub.snapshot_download`` into the Hub's own cache (``HF_HOME`` /
``HF_HUB_CACHE``, so ``HF_HUB_OFFLINE=1`` reads a cached snapshot), then are copied into a staging
folder beside the target, verified, and swapped in whole (:func:`zoo.store.staged_dir`): a failed or
tampered download never becomes a store entry. Each fetched folder records where it came from in
``hub.json`` (repo, revision, commit).

This module is core: it imports the store, the registry and the cards, never training, export or
serving; ``huggingface_hub`` is imported when a repo is fetched or pushed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import zoo.store as store
from zoo import __version__
from zoo.card import render_card
from zoo.errors import UsageError
from zoo.registry import ZooEntry

PREFIX = "hf-hub:"
HUB_FOLDER = "hf-hub"  # under ZOO_HOME: fetched direct references
RECORD = "hub.json"
# Hidden files (staging leftovers) are never pushed, nor the card (rendered anew) or a fetched folder's record.
_NOT_PUSHED = ("README.md", RECORD)
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(OSError):
    """The Hub could not be reached, or a repo or revision is not there (or not cached, offline)."""


def is_hub_ref(ref: object) -> bool:
    """Whether ``ref`` is an ``hf-hub:`` reference (a string starting with ``hf-hub:``)."""
    return isinstance(ref, str) and ref.startswith(PREFIX)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``hf-hub:org/repo[@rev]`` (or ``org/repo[@rev]``) -> ``("org/repo", "rev" or None)``."""
    spec = ref.removeprefix(PREFIX)
    repo_id, _, revision = spec.partition("@")
    check_repo_id(repo_id)
    if "@" in spec and not revision:
        raise UsageError(f"{ref!r}: an empty revision after '@'; give hf-hub:{repo_id} or hf-hub:{repo_id}@<revision>")
    return repo_id, revision or None


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.fullmatch(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"{repo_id!r} is not a Hugging Face Hub repo id; give <org or user>/<name>, "
                         "e.g. my-org/baseline-resnet18-breastmnist")
    return repo_id


def hub_dir(repo_id: str, revision: str | None = None) -> Path:
    """Where a direct reference lives in the store: ``<ZOO_HOME>/hf-hub/<org>--<repo>@<revision>``."""
    return store.zoo_home() / HUB_FOLDER / f"{repo_id.replace('/', '--')}@{quote(revision or 'main', safe='')}"


# ----------------------------------------------------------------------------------------- fetching


def fetch(ref: str, revision: str | None = None, refresh: bool = False) -> Path:
    """The store folder of ``hf-hub:org/repo[@rev]``, downloaded and verified the first time.

    ``revision`` overrides the one in ``ref``; ``refresh`` downloads again even if the folder is there.
    """
    repo_id, rev = parse_ref(ref)
    rev = revision or rev
    return _fetch_into(hub_dir(repo_id, rev), repo_id, rev, expect=None, refresh=refresh)


def fetch_entry(entry: ZooEntry, refresh: bool = False) -> Path:
    """Fetch a registry entry whose ``weights`` are ``hf-hub:<repo>[@rev]`` into its store folder."""
    if not is_hub_ref(entry.weights):
        raise ValueError(f"{entry.name}: weights {entry.weights!r} are not on the Hub (hf-hub:<repo>)")
    repo_id, rev = parse_ref(entry.weights)
    return _fetch_into(store.entry_dir(entry.name), repo_id, rev, expect=entry, refresh=refresh)


def _fetch_into(target: Path, repo_id: str, revision: str | None, expect: ZooEntry | None, refresh: bool) -> Path:
    if (target / "config.json").is_file() and not refresh:
        return target  # downloaded once; zoo.load verifies every weight file's sha256 on each load
    ref = f"{PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    snapshot = Path(_snapshot(repo_id, revision, ref))
    with store.staged_dir(target) as tmp:
        shutil.copytree(snapshot, tmp, symlinks=False, dirs_exist_ok=True,  # the cache's links -> real files
                        ignore=shutil.ignore_patterns(".cache", ".git", ".gitattributes", ".huggingface"))
        _check_download(tmp, ref, expect)
        record = {"repo_id": repo_id, "revision": revision or "main", "commit": snapshot.name,
                  "fetched": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        store.write_json_atomic(tmp / RECORD, record)
    return target


def _snapshot(repo_id: str, revision: str | None, ref: str) -> str:
    # function-level import: the Hub client (and its HTTP stack) only when a repo is fetched
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=repo_id, revision=revision)
    except Exception as e:  # offline and not cached, no such repo or revision, no access, no network
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        offline = " (HF_HUB_OFFLINE is set: only cached snapshots can be read)" if _offline() else ""
        raise HubError(f"cannot fetch {ref} from the Hugging Face Hub{offline}: {type(e).__name__}: {first}") from None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def _check_download(d: Path, ref: str, expect: ZooEntry | None) -> None:
    """A downloaded folder must be a zoo entry whose weight files match config.json (and be ``expect``)."""
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"hub repo {ref.removeprefix(PREFIX)} holds no zoo config.json: not a zoo entry "
                                "(publish one with `zoo push`)")
    try:
        cfg = store.read_config(d)
        store.verify(d, cfg["sha256"])
        got = ZooEntry.from_dict(cfg["entry"])
    except (store.WeightsCorruptedError, ValueError) as e:
        why = str(e).split("; delete ", 1)[0].replace(f"{d}/", "").replace(str(d), ref)
        why = why.removeprefix(f"{d.name}: ")
        raise store.WeightsCorruptedError(f"{ref}: {why}; the repo's files do not match its config.json, so "
                                          "nothing was stored: ask its owner to push the entry again") from None
    # where the weights live is no part of what they are: the built entry says None, the registry hf-hub:...
    if expect is not None and dataclasses.replace(got, weights=expect.weights) != expect:
        diff = [k for k, v in expect.to_dict().items() if k != "weights" and got.to_dict().get(k) != v]
        raise store.WeightsCorruptedError(
            f"{ref} holds {got.name}, which differs from the registry's {expect.name} in {', '.join(diff)}; "
            "nothing was stored: the registry entry's weights must point at a push of this very entry")


# ----------------------------------------------------------------------------------------- pushing


@dataclass(frozen=True)
class PushResult:
    """What ``zoo push`` uploaded (or, with ``dry_run``, would upload)."""

    repo_id: str
    revision: str
    files: list[str]
    commit_message: str
    folder: Path | None = None  # the dry run's folder
    url: str | None = None  # the commit's URL on the Hub
    card: dict[str, Any] = field(default_factory=dict)


def push(folder: Path, repo_id: str, revision: str | None = None, private: bool = False,
         dry_run: Path | None = None, commit_message: str | None = None) -> PushResult:
    """Publish the built entry folder ``folder`` as the Hub model repo ``repo_id``.

    The weights are verified first (a corrupted entry is never published). What is uploaded is the
    folder (hidden files left out) with its card re-rendered for the Hub (``README.md``: front matter,
    sizes, export bundles, ``zoo.load("hf-hub:<repo_id>")``). The repo is created if missing
    (``create_repo(exist_ok=True)``; ``private`` applies only then), a ``revision`` other than main is
    created as a branch, and after the commit the repo at that revision holds exactly these files
    (``delete_patterns="*"``: no stale weight file a download would refuse as unrecorded).

    Args:
        dry_run: write the folder that would be uploaded into this (new or empty) folder, upload nothing.
    """
    check_repo_id(repo_id)
    folder = Path(folder)
    cfg, entry = store.verified_entry(folder)
    metrics = _read_metrics(folder)
    message = commit_message or _commit_message(entry, metrics)
    card = render_card(entry, cfg, metrics, folder=folder, repo_id=repo_id)
    rev = revision or "main"
    if dry_run is not None:
        out = Path(dry_run)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise UsageError(f"--dry-run {out}: not an empty folder; give a new or empty folder")
        files = _stage(folder, out, card, link=False)
        return PushResult(repo_id, rev, files, message, folder=out)
    # function-level import: the Hub client (and its HTTP stack) only when something is pushed
    from huggingface_hub import HfApi

    api = HfApi()
    with tempfile.TemporaryDirectory(prefix=f"zoo-push-{entry.name}-") as tmp:
        files = _stage(folder, Path(tmp), card, link=True)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if rev != "main":
                api.create_branch(repo_id, branch=rev, repo_type="model", exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model", revision=rev,
                                     commit_message=message, delete_patterns="*")
        except Exception as e:  # no token, no access, no network: one line, as every zoo error
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
            raise HubError(f"cannot push to {repo_id}: {type(e).__name__}: {first}") from None
    return PushResult(repo_id, rev, files, message, url=getattr(info, "commit_url", None) or str(info))


def _read_metrics(folder: Path) -> dict[str, Any]:
    try:
        m = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        raise store.WeightsCorruptedError(f"{folder}: cannot read metrics.json ({e}); rebuild the entry") from None
    return m if isinstance(m, dict) else {}


def _commit_message(entry: ZooEntry, metrics: dict[str, Any]) -> str:
    test = metrics.get("test") or {}
    if isinstance(test.get("acc"), (int, float)) and isinstance(test.get("auc"), (int, float)):
        return f"Upload {entry.name} (medzoo {__version__}): test ACC {test['acc']:.4f} AUC {test['auc']:.4f}"
    return f"Upload {entry.name} (medzoo {__version__})"


def _stage(src: Path, out: Path, card: str, link: bool) -> list[str]:
    """Copy (or hard-link) the entry's files into ``out`` with ``card`` as README.md; the relative paths, sorted."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or rel.as_posix() in _NOT_PUSHED:
            continue
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            try:
                os.link(p, dst)
            except OSError:  # another filesystem
                shutil.copy2(p, dst)
        else:
            shutil.copy2(p, dst)
        files.append(rel.as_posix())
    (out / "README.md").write_text(card)
    return sorted([*files, "README.md"])
