"""The recipe language: models (what a recipe may say), loading (YAML, extends, overrides) and errors."""

from runner.recipe.document import Recipe
from runner.recipe.load import Loaded, find_recipe, load_recipe
from runner.recipe.problems import Pos, Problem, RecipeError

__all__ = ["Loaded", "Pos", "Problem", "Recipe", "RecipeError", "find_recipe", "load_recipe"]
