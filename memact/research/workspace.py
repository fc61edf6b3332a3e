"""Research workspaces: a git repository made from a template, and the git calls the loop needs.

Files the loop writes (results, state, logs, plots) are git-ignored, so ``git reset --hard``
never touches them and ``git status`` shows only edits of the template's files.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from importlib import resources

TEMPLATES = ("cpu", "gpu", "surrogate")
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


def _unmangle(workdir: str) -> None:
    """Undo what a reset may trip over: a template file turned into a directory, a symlink or
    something else that is not a plain file goes; a plain file gets back its read/write bits."""
    for name in (*TEMPLATE_FILES, ".gitignore"):
        path = os.path.join(workdir, name)
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(path)
        elif not stat.S_ISREG(info.st_mode):
            os.unlink(path)
        elif info.st_mode & 0o600 != 0o600:
            os.chmod(path, info.st_mode | 0o600)
    clear_stale_lock(workdir)


def clear_stale_lock(workdir: str) -> bool:
    """Remove ``.git/index.lock``, which a git command killed with the loop leaves behind (and
    which fails every later git command). Call it only where no git command can be running in
    ``workdir``: the loop is the workspace's one user. True if there was one."""
    lock = os.path.join(workdir, ".git", "index.lock")
    if os.path.exists(lock):
        os.unlink(lock)
        return True
    return False


def restore(workdir: str, commit: str) -> None:
    """Make the work tree exactly ``commit`` whatever was done to it (a proposal or a run that
    deleted, renamed, chmodded or overwrote train.py, edited prepare.py, added files).

    Raises GitError if the tree still differs from ``commit`` afterwards.
    """
    _unmangle(workdir)
    reset_to(workdir, commit)
    left = changed_paths(workdir)
    if left or not os.path.isfile(os.path.join(workdir, EDITABLE_FILE)):
        raise GitError(f"could not restore {workdir} to {short(commit)}: still changed: {', '.join(left[:5])}")


def editable_problem(workdir: str) -> str | None:
    """Why ``train.py`` in the work tree is not a runnable edit (missing, not a plain file, not
    UTF-8 text, its mode changed, other files changed), or None when it is fine."""
    path = os.path.join(workdir, EDITABLE_FILE)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{EDITABLE_FILE} was deleted"
    if not stat.S_ISREG(info.st_mode):
        return f"{EDITABLE_FILE} is no longer a plain file"
    try:
        with open(path, "rb") as f:
            f.read().decode("utf-8")
    except UnicodeDecodeError:
        return f"{EDITABLE_FILE} is not UTF-8 text"
    except OSError as err:
        return f"{EDITABLE_FILE} cannot be read ({err.strerror})"
    changed = changed_paths(workdir)
    others = [p for p in changed if p != EDITABLE_FILE]
    if others:
        return f"the proposal changed {', '.join(others[:3])}, not only {EDITABLE_FILE}"
    if changed:
        raw = git(workdir, "diff", "--raw", "--", EDITABLE_FILE).split()  # :100644 100644 <sha> <sha> M\ttrain.py
        if len(raw) >= 2 and raw[0].lstrip(":") != raw[1]:
            return f"the proposal changed the mode of {EDITABLE_FILE}"
    return None


def changed_paths(workdir: str) -> list[str]:
    """Paths that differ from HEAD in the work tree or index, untracked ones included (not ignored)."""
    proc = subprocess.run(["git", "status", "--porcelain", "-z", "--untracked-files=all"], cwd=workdir,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise GitError(f"git status failed in {workdir}: {proc.stderr.decode(errors='replace').strip()}")
    entries = proc.stdout.decode("utf-8", errors="replace").split("\0")
    paths, i = [], 0
    while i < len(entries):
        entry = entries[i]
        if len(entry) > 3:
            paths.append(entry[3:])
            if entry[0] in "RC":  # a rename or copy: the source path follows
                i += 1
                if i < len(entries) and entries[i]:
                    paths.append(entries[i])
        i += 1
    return paths


def show_file(workdir: str, commit: str, path: str) -> str:
    """The text of ``path`` at ``commit`` (from git, whatever the work tree holds)."""
    proc = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=workdir, capture_output=True, check=False)
    if proc.returncode != 0:
        raise GitError(f"git show {commit}:{path} failed in {workdir}: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode("utf-8", errors="replace")


def commit_file(workdir: str, path: str, message: str) -> str:
    """Commit the current content of ``path`` (a tracked file) alone; returns the new commit's hash."""
    git(workdir, "commit", "-q", "-m", message, "--", path)
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

    The patch must only edit the text of ``train.py``: one that deletes, renames, creates
    or changes the mode of a file, or is binary, is refused before anything is applied;
    ``git apply --check`` must accept it, and ``git apply`` itself applies all hunks or none.
    Raises PatchRejected with the reason otherwise; the work tree is then unchanged.
    """
    if not isinstance(patch, str) or not patch.strip():
        raise PatchRejected("empty patch")
    if not patch.endswith("\n"):
        patch += "\n"
    try:
        data = patch.encode("utf-8")
    except UnicodeEncodeError:
        raise PatchRejected("the patch is not valid UTF-8 text") from None
    if b"\0" in data:
        raise PatchRejected("the patch holds a NUL byte")
    # --recount: models often get the line counts of hunk headers wrong; the context lines decide.
    flags = ("--recount", "--whitespace=nowarn")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "apply", *args, *flags, "-"], cwd=workdir, input=data, capture_output=True)

    def text(out: bytes) -> str:
        return out.decode("utf-8", errors="replace").strip()

    stat_ = run("--numstat", "--summary")
    if stat_.returncode != 0:
        raise PatchRejected(text(stat_.stderr) or "git apply could not read the patch")
    lines = [line for line in text(stat_.stdout).splitlines() if line.strip()]
    numstat = [line.split("\t") for line in lines if "\t" in line]
    summary = [line.strip() for line in lines if "\t" not in line]
    paths = [fields[-1] for fields in numstat]
    if not paths:
        raise PatchRejected("the patch changes no file")
    others = [p for p in paths if p != EDITABLE_FILE]
    if others:
        raise PatchRejected(f"the patch may only edit {EDITABLE_FILE}, it also edits {', '.join(others)}")
    if any(fields[0] == "-" for fields in numstat):
        raise PatchRejected(f"the patch is binary: it may only edit the text of {EDITABLE_FILE}")
    for line in summary:  # " delete mode 100644 train.py", " mode change 100644 => 100755 train.py", ...
        for word, what in (("delete", "deletes"), ("create", "creates"), ("rename", "renames"), ("copy", "copies"),
                           ("mode", "changes the mode of")):
            if line.startswith(word):
                raise PatchRejected(f"the patch {what} {EDITABLE_FILE}: it may only edit its text")
        raise PatchRejected(f"the patch does more than edit {EDITABLE_FILE}'s text ({line[:80]})")
    check = run("--check")
    if check.returncode != 0:
        raise PatchRejected(text(check.stderr) or "git apply --check failed")
    done = run()
    if done.returncode != 0:
        raise PatchRejected(text(done.stderr) or "git apply failed")
