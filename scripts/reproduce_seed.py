#!/usr/bin/env python
"""Reproduce the seed's experiments in miniature on the built-in default (same as ``tp-trainer report``).

    python scripts/reproduce_seed.py                      # 6 layouts x 200 steps + 2 resumed runs, world 4
    python scripts/reproduce_seed.py --max-steps 60 --world-size 2 --layouts 0,4 --no-resume   # quick look

Writes docs/seed-miniature/{loss_curves.png, resume_zero1.png, resume_zero2.png, report.md, results.json};
see tp_trainer/commands/report.py for what each run is and tp_trainer/app/report.py for the agreement check.
"""

import sys

from tp_trainer.commands.report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
