"""What is at a path, for error messages that say what a file actually is (a text file given as a
checkpoint is not "pickled objects"; sniffs the first bytes only), and the `python_path` folders a
user's own .py files are imported from (model, data and custom_config classes)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path


def describe_path(path: str | Path) -> str:
    """What is at `path`, for error messages: 'a folder', 'an empty file', 'a zip archive', 'a text
    file (starts "# Title")', 'a legacy pickle', ... or 'missing'. Sniffs the first bytes only."""
    file = Path(path)
    try:
        if file.is_symlink() and not file.exists():
            return f"a broken symbolic link (to {os.readlink(file)})"
        if not file.exists():
            return "missing (nothing at that path)"
        if file.is_dir():
            return "a folder"
        if not file.is_file():
            return "a special file (a device, pipe or socket)"
        size = file.stat().st_size
        if size == 0:
            return "an empty file (0 bytes)"
        with file.open("rb") as handle:
            head = handle.read(512)
    except OSError as error:
        return f"unreadable ({error.strerror or type(error).__name__})"
    if head.startswith(b"PK\x03\x04"):
        return f"a zip archive of {size} bytes (torch.save's format)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return f"a legacy pickle of {size} bytes (pickle.dump, or torch.save without zip)"
    if head.startswith(b"\x93NUMPY"):
        return f"a NumPy .npy array of {size} bytes"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")):
        return f"an image of {size} bytes"
    if head.startswith(b"SQLite format 3\x00"):
        return f"an SQLite database of {size} bytes"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not just a multi-byte character cut by the 512-byte read
            return f"a binary file of {size} bytes"
        text = head[: error.start].decode("utf-8")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"a text file of {size} bytes (starts {first[:40]!r})"


def path_status(path: str | Path) -> str:
    """'does not exist', or 'is <what describe_path finds>': for messages `key='value' <status>; ...`."""
    what = describe_path(path)
    return "does not exist" if what.startswith("missing") else f"is {what}"


def is_torch_file(path: str | Path) -> bool:
    """torch.load can only read zip archives (torch.save) and legacy pickles."""
    return describe_path(path).startswith(("a zip archive", "a legacy pickle"))


def use_python_path(folders: list[str], target: str) -> list[str]:
    """Put `folders` (made absolute) at the front of sys.path so `target` can live in a user's own file.

    A module of the same top-level name imported earlier from elsewhere (a previous run in this process,
    e.g. a sweep or a test) would shadow the file now on the path, so it is forgotten first."""
    resolved = [str(Path(folder).resolve()) for folder in folders]
    for folder in reversed(resolved):
        if folder in sys.path:
            sys.path.remove(folder)
        sys.path.insert(0, folder)
    if not resolved:
        return resolved
    importlib.invalidate_caches()  # finders cache folder listings; the user's file may be newer
    top = target.split(".")[0]
    for folder in resolved:
        provided = [Path(folder, f"{top}.py"), Path(folder, top, "__init__.py")]
        found = next((file for file in provided if file.is_file()), None)
        if found is None:
            continue
        loaded = sys.modules.get(top)
        if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != found.resolve():
            for name in [name for name in sys.modules if name == top or name.startswith(f"{top}.")]:
                del sys.modules[name]
        break
    return resolved
