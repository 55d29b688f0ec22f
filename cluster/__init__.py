"""Where a run executes: an embedded local Ray (default) or an existing cluster (`RAY_ADDRESS`)."""
