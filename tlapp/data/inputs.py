"""What DATA and `tlapp predict`'s inputs name: the files of folders, globs and list files,
the folder a list's paths are relative to, a TFDS dataset written out as a folder."""
from __future__ import annotations

import glob
import os
from pathlib import Path

from tlapp.constants import IMAGE_EXTENSIONS
from tlapp.data import sources
from tlapp.data.candidates import is_ignored, list_files


def expand_inputs(items: list[str]) -> list[str]:
    """Files as given, folders as the images under them, globs as their matches, list
    files (CSV, JSON Lines with a `path` column) as the images they name, in order.

    An item that yields nothing (a missing file, a glob that matches nothing, a folder with
    no images) is kept as it is, so the caller reports it rather than dropping it silently.
    """
    paths = []
    for item in items:
        path = Path(item).expanduser()
        if sources.is_list_file(path):  # a CSV or JSON Lines list: the images it names
            found = [os.path.join(path.parent, row.path) for row in
                     sources.read_list(path, labels=False) if row.path]
        elif path.is_dir():
            found = [str(f) for f in list_files(path) if not is_ignored(f.name)
                     and f.suffix.lower() in IMAGE_EXTENSIONS]
        elif not path.exists() and glob.has_magic(item):
            found = sorted(glob.glob(os.path.expanduser(item), recursive=True))
        else:
            found = []
        paths += found or [str(path)]
    return paths


def data_root(data: Path) -> Path:
    """The folder image paths of DATA are relative to: a list file's folder, else DATA."""
    return data.parent if sources.is_list_file(data) else data


def resolve_data(data: str, cache_dir: Path) -> Path:
    """The image folder for DATA: the folder itself, or a TFDS dataset written out as one."""
    if data.startswith("tfds:"):
        from tlapp.data import tfds  # TensorFlow Datasets is slow to import: only for tfds:

        return tfds.materialize_tfds(data[len("tfds:"):], Path(cache_dir) / "tfds")
    return Path(data).expanduser()
