"""What a launch config may name, and the one guard every delete goes through.

A launch config is typed by anyone who can open the launchpad, so a value that becomes part of a
path (a study name, a sub-folder) is a plain name: no separator, no ``..``, not absolute. And a
folder is removed only when its resolved location (symlinks followed) lies inside the output
folder, never the output folder itself: a bad name, a symlink planted in the outputs or a bug that
builds a path elsewhere is refused, loudly, instead of deleting someone's files.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_NAME = re.compile(NAME_PATTERN)


class OutsideOutputs(ValueError):
    """A path that would reach outside the output folder."""


def check_name(value: str, field: str) -> str:
    """``value`` when it is a plain file name (letters, digits, ``.``, ``_``, ``-``; starts with a
    letter or digit; at most 100 characters), else ValueError naming ``field`` and what is allowed."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{field} {value!r} is not a plain name: it becomes a folder name under the output folder, so "
            "it may hold only letters, digits, '.', '_' and '-' (no '/', no '..', not absolute), start "
            "with a letter or digit and be at most 100 characters long, e.g. 'ctr_tuning_v2'")
    return value


def inside(root: str | os.PathLike, target: str | os.PathLike, what: str = "path") -> Path:
    """``target`` resolved (symlinks followed), when that lies strictly inside ``root`` (resolved
    too); else OutsideOutputs naming both."""
    root_r, target_r = Path(root).resolve(), Path(target).resolve()
    if target_r == root_r or not target_r.is_relative_to(root_r):
        raise OutsideOutputs(
            f"refusing to touch {what} {target} (resolves to {target_r}): it is not inside the output folder "
            f"{root_r}. Nothing was deleted or written there.")
    return target_r


def remove_tree(root: str | os.PathLike, target: str | os.PathLike, what: str = "folder") -> None:
    """Delete the folder (or file) ``target`` when it resolves inside the output folder ``root``;
    refuse anything else (OutsideOutputs), a symlink that points outside included."""
    resolved = inside(root, target, what)
    if resolved.is_dir():
        shutil.rmtree(resolved, ignore_errors=True)
    elif resolved.exists():
        resolved.unlink()


def check_sqlite_url(url: str, roots: list[str | os.PathLike], field: str) -> str:
    """``url`` unless it is a sqlite URL whose database file lies outside every folder of ``roots``
    (the output folder, the Dagster instance's home): a launch config must not create or change a
    database elsewhere. Server URLs (postgresql://, mysql://) name no local file and pass."""
    if not url.lower().startswith("sqlite"):
        return url
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except Exception:  # noqa: BLE001 - any parse error: refused below with the same advice
        parsed = None
    if parsed is not None and parsed.database in (None, "", ":memory:"):
        return url  # an in-memory database: nothing on disk
    allowed = [Path(r).resolve() for r in roots]
    # sqlite's own URI form (?uri=true) can name any file: refused rather than parsed
    target = None if parsed is None or "uri" in parsed.query else Path(parsed.database).resolve()
    if target is None or not any(target != r and target.is_relative_to(r) for r in allowed):
        raise OutsideOutputs(
            f"{field}: a sqlite database outside the output folder and the Dagster instance's home is refused "
            f"({url!r}). Leave it empty (the instance's own database), use sqlite:///<file> under "
            f"{' or '.join(str(r) for r in allowed)}, or a database server URL (postgresql://...).")
    return url
