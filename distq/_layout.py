"""Guard for the source folders that install under other names (comm/ -> distq.comm, theory/ ->
distq.theory, launch/ -> distq.launch; pyproject's package-dir)."""

from __future__ import annotations


def require_package_name(imported_as: str, installed_as: str) -> None:
    """Refuse an import of a folder by its bare name (`import comm` from the repository root,
    where pytest and torchrun run): it would load a second copy of every module beside
    `installed_as`, whose classes fail `isinstance` checks against the first."""
    if imported_as != installed_as:
        raise ImportError(
            f"'{imported_as}' is distq's source folder for {installed_as}; import "
            f"{installed_as} (a second copy of its modules would break isinstance checks)"
        )
