"""Recipes: one attribution method per file, each an nnsight trace feeding the kernels.

Installed as ``nnattr.recipes``; each file is also a template to copy. Run one with
``python -m nnattr.recipes.<name> --help``.
"""
