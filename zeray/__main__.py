"""`python -m zeray ...`: the same CLI as the `zeray` console script (no install needed on a Ray cluster)."""

from zeray.cli import main

raise SystemExit(main())
