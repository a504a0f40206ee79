"""The ``aalconvert`` command line."""

import argparse
import sys

from aalconvert import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aalconvert",
        description="Convert PyTorch models to train in less memory, and report what is saved.",
    )
    parser.add_argument("--version", action="version", version=f"aalconvert {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("rules", help="list the conversion rules, what each changes, and their options")
    return parser


def print_rules() -> None:
    """The rule table: name, whether forward and gradients stay exact, options, description."""
    from rich.console import Console
    from rich.table import Table

    from aalconvert.rules.registry import AUTO, NAMES, OPTIONS_BY_RULE, PRECEDENCE, build_rule

    table = Table(title=f"aalconvert rules (precedence: {' > '.join(PRECEDENCE)})")
    for column in ("rule", "forward exact", "gradient exact", "options", "what it does"):
        table.add_column(column)
    for name in NAMES:
        if name == "auto":
            table.add_row(name, "no (ASA)", "no", "all of its rules'", "the paper's recipe: " + " + ".join(AUTO))
            continue
        rule = build_rule(name, {})
        family = "approx" if name.startswith("approx") else name
        options = ", ".join(OPTIONS_BY_RULE.get(family, ())) or "-"
        yes_no = lambda flag: "yes" if flag else "no"
        table.add_row(name, yes_no(rule.forward_exact), yes_no(rule.gradient_exact), options, rule.description)
    Console().print(table)
    print("every rule also takes skip= (module names or a predicate (module, name) -> bool)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "rules":
        print_rules()
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
