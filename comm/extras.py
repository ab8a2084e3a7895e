"""Optional integrations import their engine through `require`, so a missing engine fails with
the pip extra that installs it, and `import distq` never imports DeepSpeed, Horovod, Lightning
or transformers."""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {
    "deepspeed": "deepspeed",
    "horovod.torch": "horovod",
    "pytorch_lightning": "lightning",
    "transformers": "transformers",
}
NOTES = {"horovod": " (Horovod builds from source against torch: see .ci/install-horovod.sh)"}


def require(module: str) -> ModuleType:
    """Import `module` (a key of EXTRAS), or raise ImportError naming the extra to install."""
    extra = EXTRAS[module]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"distq's {extra} integration needs {module}, which failed to import ({exc}): "
            f"pip install 'distq[{extra}]'{NOTES.get(extra, '')}"
        ) from exc
