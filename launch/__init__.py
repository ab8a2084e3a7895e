"""distq.launch: the CLI, config schema, recipes, torchrun/SLURM environment, checkpoints."""

from distq._layout import require_package_name

require_package_name(__name__, "distq.launch")
