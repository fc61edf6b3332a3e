"""Model assets shipped with the package: small, produced by a command of the package, recorded
beside it (``tiny_warm/ASSET.md``: command, seed, measured figures)."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent


def tiny_warm() -> Path:
    """The tiny model after the default copy warm-up (``memact pretrain``): an HF model directory.

    ``memact demo`` starts from it, since the warm-up (19-41 minutes of one core) does not fit
    the demo's time.
    """
    path = ASSETS / "tiny_warm"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors: the package was installed without its assets "
                                "(package_data 'memact.assets'); reinstall it, or run the recipe in ASSET.md")
    return path
