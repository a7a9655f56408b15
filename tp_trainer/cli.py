"""``tp-trainer COMMAND ...``: one entry point, one module per command in :mod:`tp_trainer.commands`.

Each command module exposes ``main(argv: list[str]) -> int`` and a one-line ``HELP``; commands
parse their own arguments (``train`` uses ``HfArgumentParser``), so this file only dispatches.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "plan": "tp_trainer.commands.plan",
    "train": "tp_trainer.commands.train",
    "eval": "tp_trainer.commands.eval",
    "export": "tp_trainer.commands.export",
    "estimate": "tp_trainer.commands.estimate",
    "report": "tp_trainer.commands.report",
}


def _usage() -> str:
    lines = ["usage: tp-trainer COMMAND [ARGS...]", "", "commands:"]
    for name, module in COMMANDS.items():
        try:
            help_text = importlib.import_module(module).HELP
        except ImportError:
            continue
        lines.append(f"  {name:<9} {help_text}")
    lines.append("")
    lines.append("Run 'tp-trainer COMMAND --help' for the arguments of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tp-trainer: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name])
    except ImportError as err:
        print(f"tp-trainer: command {name!r} is not available ({err})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
