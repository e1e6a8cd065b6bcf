"""Where the sets are: an explicit folder, a system package, the cache; an optional download. Torch-free
(torchvision's downloaders are imported only when a download is asked for)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import UsageError

__all__ = ["data_home", "download", "locate"]


def data_home() -> Path:
    """The cache folder: ``$EXPANDCTL_DATA``, else ``$XDG_CACHE_HOME/expandctl/data``, else
    ``~/.cache/expandctl/data``."""
    if os.environ.get("EXPANDCTL_DATA"):
        return Path(os.environ["EXPANDCTL_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "expandctl" / "data"


def locate(
    name: str,
    arg: str | None,
    download: bool,
    has_files: Callable[[Path], bool],
    fetch: Callable[[Path], Path],
    system: Sequence[Path] = (),
    hint: str = "",
) -> Path:
    """The folder holding ``name``: ``arg`` if given; else the ``system`` folders, then the cache. With
    ``download``, a set found nowhere is fetched (``fetch(folder)``) into ``arg`` or the cache. ``hint``
    (e.g. ``"install Debian's dataset-fashion-mnist, "``) goes into the not-found message."""
    places = [Path(arg)] if arg else [*system, data_home() / name]
    for place in places:
        if has_files(place):
            return place
    target = places[-1]
    if download:
        return fetch(target)
    if arg:
        return target  # the reader names the files it expected there
    looked = " and ".join(str(p) for p in places)
    raise UsageError(
        f"{name}: not found in {looked}; pass download to fetch it into {target}, run `make data`, "
        f"{hint}or give the spec {name}:DIR (EXPANDCTL_DATA sets the cache folder)",
        option="download",
    )


def download(name: str, root: Path, dataset: str, hint: str = "") -> Path:
    """Fetch ``name`` with torchvision's dataset class ``dataset`` (e.g. ``"MNIST"``) into ``root`` (its own
    layout, which the readers accept). Any failure is one line saying what to do instead."""
    from torchvision import datasets  # lazy: torchvision's downloaders, only when a download is asked for

    cls = getattr(datasets, dataset)
    # On failure, remove what this call created (the cache folders, torchvision's partial files), so a
    # failed download leaves the cache as it found it.
    created = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # no network, proxy, disk full, bad checksum: urllib and torchvision raise many types
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        else:
            for new in (set(root.iterdir()) - before) if root.is_dir() else ():
                if new.is_dir():
                    shutil.rmtree(new, ignore_errors=True)
                else:
                    new.unlink(missing_ok=True)
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UsageError(
            f"downloading {name} into {root} failed ({reason}); {hint}put the files in {root} yourself, "
            f"or set EXPANDCTL_DATA to a folder that holds them, or give the spec {name}:DIR"
        ) from None
    return root
