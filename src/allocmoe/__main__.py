"""`python -m allocmoe ...` (and `torchrun --nproc-per-node N -m allocmoe ...`): the `allocmoe` command."""

from .cli import main

if __name__ == "__main__":
    main()
