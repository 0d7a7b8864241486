"""Recipe problems pointed at the file, line and column that caused them.

Every problem a user can make in a recipe ends up as one `Problem`; the loader collects all of them and raises one
`RecipeError`, which the CLI prints as `FILE:LINE:COL: field.path: message` lines and exit code 2 (never a traceback).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Pos:
    """Where a value was written: a file with 1-based line and column, or a command-line override."""

    file: str
    line: int = 1
    col: int = 1
    override: str | None = None

    def __str__(self) -> str:
        if self.override is not None:
            return f"override '{self.override}'"
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Problem:
    pos: Pos
    loc: Loc
    message: str

    def __str__(self) -> str:
        path = dotted(self.loc) or "(recipe)"
        return f"{self.pos}: {path}: {self.message}"


class RecipeError(RunnerError):
    """One or more problems with a recipe; str() lists them all, one per line."""

    def __init__(self, problems: list[Problem]):
        self.problems = sorted(set(problems), key=_problem_order)
        super().__init__("\n".join(str(p) for p in self.problems))


def _problem_order(problem: Problem) -> tuple[Any, ...]:
    return (problem.pos.override is not None, problem.pos.file, problem.pos.line, problem.pos.col, str(problem.loc))


def dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, [c for c in choices if c != word], n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def relative(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except (OSError, ValueError):  # not below it, or a name the OS refuses (a NUL byte, too long): as given
        return str(path)
