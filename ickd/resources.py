"""Where the shipped files live: ``configs/``, ``sweeps/`` and ``slurm/profiles/``.

In the repository they are top-level folders. A built wheel carries them as package data under
``ickd/_shipped/`` (``setup.py`` maps ``ickd._shipped.configs`` -> ``configs/`` and so on), so a
non-editable install finds them without a checkout. :func:`shipped_path` returns the packaged copy
when it exists, else the checkout's folder (a source checkout, an editable install, or a launch's
code snapshot, which copies ``ickd/``, ``configs/`` and ``sweeps/`` side by side).

User config folders: ``ICKD_CONFIG_PATH=dir1:dir2`` (``os.pathsep``-separated) adds folders to
Hydra's search path for every composition in this process (``ickd train``, ``compose_run_config``
and so every launch, sweep and compare), after the primary folder, the same place Hydra's own
``hydra.searchpath=[file:///dir]`` puts them. ``ICKD_CONFIG_DIR`` replaces the primary folder.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

__all__ = ["SHIPPED", "shipped_path", "user_config_dirs", "install_user_config_path"]

#: name -> the folder in the repository (the packaged copy is ickd/_shipped/<name>).
SHIPPED = {"configs": "configs", "sweeps": "sweeps", "profiles": "slurm/profiles"}

_PKG = Path(__file__).resolve().parent
ENV_CONFIG_PATH = "ICKD_CONFIG_PATH"


def shipped_path(name: str) -> Path:
    """The folder of shipped ``name`` files (``configs``, ``sweeps`` or ``profiles``).

    The packaged copy (a wheel install) wins; else the checkout's top-level folder. The path is
    returned even when neither exists, so callers can name it in their own error message."""
    if name not in SHIPPED:
        raise KeyError(f"unknown shipped folder {name!r}; one of {sorted(SHIPPED)}")
    packaged = _PKG / "_shipped" / name
    if packaged.is_dir():
        return packaged
    return _PKG.parent / SHIPPED[name]


def user_config_dirs() -> list[Path]:
    """The folders named by ``ICKD_CONFIG_PATH`` (absolute; empty entries skipped).

    A named folder that does not exist is skipped with a warning that names it (a typo there
    would otherwise only show up as Hydra's "Could not find 'experiment/...'")."""
    raw = os.environ.get(ENV_CONFIG_PATH, "")
    dirs = []
    for entry in raw.split(os.pathsep):
        if not entry.strip():
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            warnings.warn(
                f"{ENV_CONFIG_PATH} names {entry!r}, which is not a folder: ignored; fix or drop that "
                f"entry ({ENV_CONFIG_PATH} is a {os.pathsep!r}-separated list of config folders)",
                stacklevel=2,
            )
            continue
        dirs.append(path)
    return dirs


_installed = False


def install_user_config_path() -> None:
    """Register (once per process) a Hydra search-path plugin that appends ``ICKD_CONFIG_PATH``'s
    folders; the variable is read at each composition, so later changes to it apply."""
    global _installed
    if _installed:
        return
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class IckdUserConfigPath(SearchPathPlugin):
        def manipulate_search_path(self, search_path) -> None:  # type: ignore[no-untyped-def]
            for path in user_config_dirs():
                search_path.append(provider="ickd-user", path=f"file://{path}")

    IckdUserConfigPath.__module__ = __name__
    Plugins.instance().register(IckdUserConfigPath)
    _installed = True
