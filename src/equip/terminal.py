"""equip's own lines in the terminal, and its one way out with an error.

Both consoles print strings as plain text, never parsed as Rich markup (markup=False): a value
such as `data.root='photos[/y]'` in a message or a table cell must not turn one line into a
MarkupError traceback. Styles come only from the (text, style) pairs equip itself passes.
Tables and reports go to stdout (`report`); everything else, errors included, to stderr
(`console`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import NoReturn

from rich.console import Console
from rich.text import Text

from equip.track.redaction import strip_secrets

Part = str | tuple[str, str]  # plain text, or (text, Rich style)

# soft_wrap: long paths stay whole on one line, greppable.
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)
# Pipes and CI get 200 columns: a leaderboard is not wrapped at 80.
report = Console(markup=False, highlight=False, width=None if sys.stdout.isatty() else 200)


def say(*parts: Part) -> None:
    """One line on stderr: strings exactly as they are, (text, style) pairs styled."""
    console.print(Text.assemble(*parts))


def printed_help(args: list[str], text: str | None, *, without_args: bool = True) -> bool:
    """A command's `-h`/`--help` (first argument), or no argument at all for a command that
    needs some (`without_args`): `text` (its usage, the module's doc) printed, and True."""
    if (args and args[0] in ("-h", "--help")) or (without_args and not args):
        print(text)
        return True
    return False


def fail_if_refused(
    error: BaseException, keep_traceback: Callable[[BaseException], str] | None = None
) -> None:
    """One line and exit when `error` is the tracking store refusing equip's credentials or a
    request (equip.track.refusals); otherwise nothing: the caller goes on with the error. An
    unexpected refusal names the file `keep_traceback` saved the traceback to, for the report."""
    from equip.track.refusals import store_refusal

    refused = store_refusal(error)
    if refused is not None:
        line, code = refused
        if code == 1 and keep_traceback is not None:
            line += f" (traceback in {keep_traceback(error)})"
        fail(line, code)


def fail(message: str, code: int, details: Iterable[str] = ()) -> NoReturn:
    """`equip: error: <message>` (secrets cut out) and any detail lines, then exit with `code`
    (2: bad input, 3: the store went away, 1: unexpected)."""
    say(("equip: error:", "bold red"), " ", strip_secrets(message))
    for line in details:
        say(strip_secrets(line))
    raise SystemExit(code)
