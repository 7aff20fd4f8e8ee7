"""Bring a server folder into a dataset without copying: hard links where the filesystem allows.

`link_folder` mirrors the regular files of `source` into `target` as hard links (a copy when
linking is refused: another filesystem, `EXDEV`, or protected hard links, `EPERM`). Links are
never followed: a symbolic link is recreated as the same link, so that `validate_folder` reports
it (`link_entry`) without reading what it points to. Sockets, FIFOs and devices are reported as
`special_file` and left out. It never touches a database.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .archive import ProgressFn, StopFn
from .limits import DatasetLimits
from .problems import Problem, ValidationCancelled, problem

#: Errors on which a hard link falls back to a copy.
COPY_FALLBACK_ERRNOS = frozenset({errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK})


@dataclass
class LinkResult:
    """What `link_folder` did: files linked and copied, bytes, and problems found."""

    linked: int = 0
    copied: int = 0
    total_bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def method(self) -> str:
        """``"hard link"``, ``"copy"``, ``"hard link and copy"`` (mixed) or ``"none"``."""
        if self.linked and self.copied:
            return "hard link and copy"
        return "copy" if self.copied else "hard link" if self.linked else "none"


def link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link `source` to `target`; copy when the filesystem refuses. True when linked."""
    try:
        os.link(source, target, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno not in COPY_FALLBACK_ERRNOS:
            raise
    shutil.copyfile(source, target, follow_symlinks=False)
    return False


def link_folder(
    source: Path,
    target: Path,
    limits: DatasetLimits | None = None,
    *,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> LinkResult:
    """Mirror `source` into `target` (created) with hard links; see the module docstring.

    Stops with a `too_many_files` or `too_large` problem past the limits; `should_stop()` is
    asked before each file and raises `ValidationCancelled`.
    """
    limits = limits or DatasetLimits()
    result = LinkResult()
    target.mkdir(parents=True)
    done = 0
    for folder, dirs, files in os.walk(source, followlinks=False):
        here = Path(folder)
        rel_dir = here.relative_to(source)
        dirs.sort()
        for name in [d for d in dirs if (here / d).is_symlink()] + sorted(files):
            if should_stop is not None and should_stop():
                raise ValidationCancelled("stopped while linking files")
            path = here / name
            rel = PurePosixPath((rel_dir / name).as_posix()).as_posix()
            done += 1
            if done > limits.max_files:
                result.problems.append(
                    problem("", "too_many_files", f"the folder has more than {limits.max_files:,} files")
                )
                return result
            info = path.lstat()
            dest = target / rel_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink():
                os.symlink(os.readlink(path), dest)  # kept as a link, never followed
            elif path.is_file():
                result.total_bytes += info.st_size
                if result.total_bytes > limits.max_total_bytes:
                    result.problems.append(
                        problem(
                            "", "too_large", f"the folder holds more than {limits.max_total_bytes:,} bytes"
                        )
                    )
                    return result
                if link_or_copy(path, dest):
                    result.linked += 1
                else:
                    result.copied += 1
            else:
                result.problems.append(problem(rel, "special_file", "is not a regular file or folder"))
            if on_progress is not None:
                on_progress(done, None, "linking")
        for name in [d for d in dirs if (here / d).is_symlink()]:
            dirs.remove(name)
    return result
