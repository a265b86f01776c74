"""`python -m recipe.carl.evaluate`: see `recipe.carl.evaluate.cli`."""

from recipe.carl.evaluate.cli import main

main()
