"""`python -m allocmoe.cli ...`: the `allocmoe` command."""

from . import main

if __name__ == "__main__":
    main()
