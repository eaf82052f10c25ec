"""`equip COMMAND [ARGS]`, the console script: `equip app`, `equip predict`, `equip leaderboard`,
`equip champion`, each the same as `python -m equip.COMMAND [ARGS]`."""

from __future__ import annotations

import importlib
import sys

from equip.terminal import fail, printed_help

# Imported only when chosen: `equip leaderboard` need not load the app's web stack.
COMMANDS = {
    "app": ("equip.app", "a web page on a model: drop photos, see their classes"),
    "predict": ("equip.predict", "classify photos with a model, to a table and a CSV"),
    "leaderboard": ("equip.leaderboard", "a sweep's leaderboard, from the store"),
    "champion": ("equip.champion", "print models:/NAME/VERSION of a model's champion"),
    "deploy": ("equip.deploy", "the champion to an Azure ML online endpoint, or the app here"),
}


def usage() -> str:
    lines = [f"  {name:<12} {about}" for name, (_, about) in COMMANDS.items()]
    return "usage: equip COMMAND [ARGS]  (equip COMMAND -h for its own)\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if printed_help(args, usage()):
        return 0
    if args[0] not in COMMANDS:
        fail(f"no command {args[0]!r}; one of {', '.join(COMMANDS)} (equip -h)", 2)
    module = importlib.import_module(COMMANDS[args[0]][0])
    return module.main(args[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
