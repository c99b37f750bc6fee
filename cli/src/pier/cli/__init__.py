"""The `pier` command: one subcommand per component (`main`), plus `pier up` (`up`, the embedded
default, with its private Redis: `redis_server`) and `pier connect` (`connect`, stdio for desktop agents)."""
