"""distq: distributed training of quantized networks. Weights: distq.optim and distq.quant;
gradients on the wire: distq.comm. `import distq` imports torch and nothing optional."""

import contextlib
import warnings

# torch.compile (distq's gradient codec) imports torch.utils.mkldnn, whose class bodies call the
# deprecated torch.jit.script_method: 14 DeprecationWarnings at distq's first quantized step.
# Importing that module once here, with exactly those warnings off, keeps them from users (~7 ms).
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.filterwarnings("ignore", ".*torch.jit.script_method", DeprecationWarning)
    import torch.utils.mkldnn  # noqa: F401
