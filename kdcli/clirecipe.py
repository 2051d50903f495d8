"""`kdcli recipe`: validate, show, list and describe recipes."""

from __future__ import annotations

import sys

import typer
import yaml
from rich.console import Console

from kdcli.clihelp import Command, Group, examples
from kdcli.clioptions import SET
from kdcli.errors import printable
from kdcli.exits import report_error
from kdcli.fsio import json_text

recipe_app = typer.Typer(help="Validate, show and describe recipes.", no_args_is_help=True, cls=Group,
                         rich_markup_mode="markdown")
out_console = Console()


@recipe_app.command("validate", cls=Command, epilog=examples("recipe validate"))
def recipe_validate(
    files: list[str] = typer.Argument(..., help="recipe YAML files or built-in names"),
    set_: list[str] = SET,
) -> None:
    """Check recipes against the schema; print every problem with its field path."""
    from kdcli.training.recipe import RecipeError, load_recipe

    failed = False
    for ref in files:
        try:
            plan = load_recipe(ref, set_ or [])
        except RecipeError as err:
            failed = True
            for problem in err.problems:
                report_error(problem)
            continue
        out_console.print(f"ok: {printable(ref)} ('{plan.name}', {len(plan.stages)} stages, hash {plan.digest()})",
                          markup=False, soft_wrap=True)
    if failed:
        raise typer.Exit(2)


@recipe_app.command("show", cls=Command, epilog=examples("recipe show"))
def recipe_show(
    ref: str = typer.Argument(..., help="built-in name or YAML file"),
    set_: list[str] = SET,
) -> None:
    """Print a recipe as it would run: defaults filled in, overrides applied."""
    from kdcli.training.recipe import load_recipe

    sys.stdout.write(load_recipe(ref, set_ or []).to_yaml())


@recipe_app.command("list", cls=Command, epilog=examples("recipe list"))
def recipe_list() -> None:
    """The built-in recipes, usable by name with --recipe."""
    from kdcli.training.recipe import builtin_dir, builtin_names

    for name in builtin_names():
        raw = yaml.safe_load((builtin_dir() / f"{name}.yaml").read_text(encoding="utf-8"))
        out_console.print(f"[bold]{name}[/bold]: {' '.join(str(raw.get('description', '')).split())}")


@recipe_app.command("schema", cls=Command, epilog=examples("recipe schema"))
def recipe_schema() -> None:
    """Print the recipe's JSON Schema (for editors and CI checks)."""
    from kdcli.training.recipe import recipe_schema as schema

    sys.stdout.write(json_text(schema()))
