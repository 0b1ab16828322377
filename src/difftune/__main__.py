"""`python -m difftune` (and `accelerate launch -m difftune`) run the CLI."""

from difftune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
