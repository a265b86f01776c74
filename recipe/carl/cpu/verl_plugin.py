"""Import-time hook for ``VERL_USE_EXTERNAL_MODULES=recipe.carl.cpu.verl_plugin`` (``import verl`` imports it).

The recipe's own plugin (``recipe.carl.plugin``, loaded through setup.py's ``verl.plugins`` entry point) calls
:func:`recipe.carl.cpu.register` itself; this module exists for runs without the installed entry point.
"""

from recipe.carl.cpu import register

register()
