"""`python -m protloc ...` (and `torchrun -m protloc ...`) runs the command line."""

from protloc.cli import main

if __name__ == "__main__":
    main(prog_name="protloc")
