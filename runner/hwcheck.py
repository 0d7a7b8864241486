"""`python -m runner.hwcheck`: the GPU runner check's command (CI workflows and the GPU smoke call it by this name).
The check itself is runner/hardware/hwcheck.py; this module only runs it."""

import sys

from runner.hardware.hwcheck import main

if __name__ == "__main__":
    sys.exit(main())
