"""`python -m tlkd` (also the entry point torchrun launches)."""

from tlkd.cli import main

if __name__ == "__main__":
    main()
