"""Research workspaces: a git repository made from a template, and the git calls the loop needs.

Files the loop writes (results, state, logs, plots) are git-ignored, so ``git reset --hard``
never touches them and ``git status`` shows only edits of the template's files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from importlib import resources

TEMPLATES = ("cpu", "gpu")
TEMPLATE_FILES = ("prepare.py", "train.py", "program.md")
EDITABLE_FILE = "train.py"

RESULTS_FILE = "results.tsv"
CONTEXT_FILE = "context.tsv"
STATE_FILE = "state.json"
LOG_DIR = "logs"
PROGRESS_PLOT = "progress.png"
CONTEXT_PLOT = "context.png"

GITIGNORE = f"""\
# Written by `memact research run`; not part of any experiment.
{RESULTS_FILE}
{CONTEXT_FILE}
{STATE_FILE}
{LOG_DIR}/
*.png
.tmp-*
__pycache__/
"""


class GitError(RuntimeError):
    """A git command failed; the message holds the command and git's own error."""


def git(workdir: str, *args: str, check: bool = True, input_text: str | None = None) -> str:
    """Run ``git args`` in ``workdir``; return stdout stripped. Raises GitError when check fails."""
    proc = subprocess.run(
        ["git", *args], cwd=workdir, input=input_text, capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        raise GitError(f"git {' '.join(args)} failed in {workdir}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def template_dir(template: str) -> str:
    """The folder holding a template's files inside the installed package."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}: expected one of {', '.join(TEMPLATES)}")
    return str(resources.files("memact.research").joinpath("templates", template))


def init_workspace(directory: str, template: str = "cpu") -> str:
    """Create a research workspace: the template's files, a .gitignore, a repo and one commit.

    ``directory`` must not exist or be empty. Returns the initial commit's hash.
    """
    source = template_dir(template)
    if os.path.exists(directory) and os.listdir(directory):
        raise FileExistsError(f"workspace directory {directory} exists and is not empty")
    os.makedirs(directory, exist_ok=True)
    for name in TEMPLATE_FILES:
        shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
    with open(os.path.join(directory, ".gitignore"), "w", encoding="utf-8") as f:
        f.write(GITIGNORE)
    git(directory, "init", "-q")
    # A local identity: the loop commits on machines where no global one is configured.
    git(directory, "config", "user.name", "memact research")
    git(directory, "config", "user.email", "research@memact.invalid")
    git(directory, "add", *TEMPLATE_FILES, ".gitignore")
    git(directory, "commit", "-q", "-m", f"workspace from the {template} template")
    return head(directory)


def head(workdir: str) -> str:
    return git(workdir, "rev-parse", "HEAD")


def short(commit: str) -> str:
    return commit[:7]


def is_dirty(workdir: str) -> bool:
    """True when tracked files differ from HEAD or untracked, non-ignored files exist."""
    return bool(git(workdir, "status", "--porcelain"))


def reset_to(workdir: str, commit: str) -> None:
    """Make the work tree exactly ``commit``: hard reset, then remove untracked, non-ignored files."""
    git(workdir, "reset", "-q", "--hard", commit)
    git(workdir, "clean", "-q", "-fd")


def commit_file(workdir: str, path: str, message: str) -> str:
    """Commit the current content of ``path``; returns the new commit's hash."""
    git(workdir, "add", path)
    git(workdir, "commit", "-q", "-m", message)
    return head(workdir)


def read_file(workdir: str, path: str = EDITABLE_FILE) -> str:
    with open(os.path.join(workdir, path), encoding="utf-8") as f:
        return f.read()


def write_file(workdir: str, text: str, path: str = EDITABLE_FILE) -> None:
    with open(os.path.join(workdir, path), "w", encoding="utf-8") as f:
        f.write(text)


class PatchRejected(ValueError):
    """A proposed patch that does not apply cleanly or touches files other than train.py."""


def apply_patch(workdir: str, patch: str) -> None:
    """Apply a unified diff to train.py, all or nothing.

    The patch must only touch ``train.py``; ``git apply --check`` must accept it before it
    is applied, and ``git apply`` itself applies all hunks or none. Raises PatchRejected
    with git's reason otherwise; the work tree is then unchanged.
    """
    if not patch.strip():
        raise PatchRejected("empty patch")
    if not patch.endswith("\n"):
        patch += "\n"
    # --recount: models often get the line counts of hunk headers wrong; the context lines decide.
    flags = ("--recount", "--whitespace=nowarn")
    stat = subprocess.run(
        ["git", "apply", "--numstat", *flags, "-"], cwd=workdir, input=patch, capture_output=True, text=True
    )
    if stat.returncode != 0:
        raise PatchRejected(stat.stderr.strip() or "git apply could not read the patch")
    paths = [line.split("\t")[-1] for line in stat.stdout.splitlines() if line.strip()]
    if not paths:
        raise PatchRejected("the patch changes no file")
    others = [p for p in paths if p != EDITABLE_FILE]
    if others:
        raise PatchRejected(f"the patch may only edit {EDITABLE_FILE}, it also edits {', '.join(others)}")
    check = subprocess.run(
        ["git", "apply", "--check", *flags, "-"], cwd=workdir, input=patch, capture_output=True, text=True
    )
    if check.returncode != 0:
        raise PatchRejected(check.stderr.strip() or "git apply --check failed")
    git(workdir, "apply", *flags, "-", input_text=patch)
