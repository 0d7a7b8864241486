"""The one base class for failures a user can fix: `RunnerError`.

`recipe` (runner/cli.py) catches it and prints its message as red lines with exit code 2, never a traceback; anything
else is a bug and keeps its traceback. Subclasses, by where they are raised:

- runner.recipe.problems.RecipeError: a recipe problem, `FILE:LINE:COL: field.path: message` (LockError: the lock file);
- runner.stages.StageError: a step failed for a reason the user can act on (the executor records it in the run);
- runner.cli.UsageError: a command line that cannot work (a missing lock, an unknown step);
- runner.hardware.probe.ProfileError: a machine profile that cannot be read.

No imports here, so every layer (the recipe language, the stages, the server) can raise them.
"""

from __future__ import annotations


class RunnerError(Exception):
    """A failure the user can fix; its message says what and what to do."""
