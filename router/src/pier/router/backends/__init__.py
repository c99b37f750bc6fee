"""Session backends: `base` (what the router needs), `local/` (processes on this machine), `kubernetes`."""
