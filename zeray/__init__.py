"""zeray: fine-tune language models at cluster scale on Ray.

This package holds the command line and the run config that composes each package's section;
the work itself lives in `pipelines`, `trainers`, `tuning` and `cluster`.
"""

__version__ = "0.1.0"
