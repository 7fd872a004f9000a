"""Entry point of one packed run: ``python -m ickd.launch.child run RUNSPEC_JSON``."""
import sys

from ickd.launch.tasks import child_main

if __name__ == "__main__":
    child_main(sys.argv[1:])
