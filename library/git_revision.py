"""The toolkit's git commit (for `ss_sd_scripts_commit_hash`), read from .git files without git."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union


def get_git_revision_hash(start: Optional[Union[str, os.PathLike]] = None) -> str:
    """Commit hash of the git checkout holding this toolkit, read from .git files; "(unknown)" if none.

    No git executable is run (users may not have one); loose refs, packed-refs and `.git` files of
    worktrees/submodules are handled.
    """
    try:
        here = Path(start) if start is not None else Path(__file__).resolve().parent
        for folder in (here, *here.parents):
            git_path = folder / ".git"
            if git_path.is_file():  # worktree / submodule: "gitdir: <path>"
                text = git_path.read_text(encoding="utf-8").strip()
                if not text.startswith("gitdir:"):
                    return "(unknown)"
                git_dir = (folder / text[len("gitdir:"):].strip()).resolve()
            elif git_path.is_dir():
                git_dir = git_path
            else:
                continue
            return _resolve_git_head(git_dir)
    except (OSError, UnicodeDecodeError):
        pass
    return "(unknown)"


def _is_hash(text: str) -> bool:
    return len(text) in (40, 64) and all(c in "0123456789abcdef" for c in text.lower())


def _resolve_git_head(git_dir: Path) -> str:
    head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
    if not head.startswith("ref:"):
        return head if _is_hash(head) else "(unknown)"
    ref = head[len("ref:"):].strip()
    # worktrees keep refs in the common dir
    common = git_dir
    if (git_dir / "commondir").is_file():
        common = (git_dir / (git_dir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    for base in (git_dir, common):
        ref_file = base / ref
        if ref_file.is_file():
            value = ref_file.read_text(encoding="utf-8").strip()
            return value if _is_hash(value) else "(unknown)"
    for base in (git_dir, common):
        packed = base / "packed-refs"
        if packed.is_file():
            for line in packed.read_text(encoding="utf-8").splitlines():
                parts = line.strip().split(" ")
                if len(parts) == 2 and parts[1] == ref and _is_hash(parts[0]):
                    return parts[0]
    return "(unknown)"
