"""Recipes: one attribution method per file, each an nnsight trace feeding the kernels.

Installed as ``nnattr.recipes``; each file is also a template to copy (docs/recipes.md). Every
file here is a command: ``nnattr <name> --help``, ``python -m nnattr.recipes.<name> --help``, or
``python recipes/<name>.py --help`` (a copy under any name runs its own code).
"""
