"""Copy standard input to standard output, each line prefixed with the seconds since this script started.

python3 -m src.training.worker ... 2>&1 | python3 scripts/stamp_lines.py     # where a job's time goes
"""

import sys
import time

started = time.monotonic()
for line in sys.stdin:
    sys.stdout.write(f"{time.monotonic() - started:8.2f} {line}")
    sys.stdout.flush()
