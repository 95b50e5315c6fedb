"""EDPS workflows for the soxs recipes, generated from the recipes' declarations.

This directory is an EDPS ``workflow_dir``: it holds one workflow package per instrument,
``soxs`` (SOXS) and ``soxs_xshooter`` (X-shooter reduced with the soxs recipes; ESO's own
X-shooter workflow is called ``xshooter``), each with its ``<name>_wkf.py`` module.  Their
text is written by :mod:`soxs_archive.edps.generate` from the same declarations (``InputSpec``,
``OutputSpec`` and ``RecipeSpec`` of :data:`soxs_recipes.registry.RECIPES`, the frame types of
:data:`soxs_core.detector.rawframe.FRAME_TYPES`, the validity windows of
``calib/static/association.yaml``) that ``soxs-reduce`` organises an archive with; the tests
regenerate it and compare, so the two cannot disagree unnoticed.

The workflow modules import only ``edps``: they run in EDPS's own Python environment, where the
soxs packages need not be importable.
"""
