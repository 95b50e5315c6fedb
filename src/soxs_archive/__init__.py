"""Archive and night reprocessing: organise a directory of raw frames into reduction steps,
associate calibrations, write one SOF per step and run the graph of steps with Dask.

Stages, in the order a run goes through them:

- :mod:`soxs_archive.catalogue`: scan directories, classify each frame from its header and
  keep the frame catalogue in an sqlite database in the workspace;
- :mod:`soxs_archive.plan`: group frames into steps and associate calibrations, following
  the recipes' declarations; write the SOFs; print the plan;
- :mod:`soxs_archive.execute`: run the plan's graph on a Dask cluster, resumably;
- :mod:`soxs_archive.summary`: the run's summary (terminal table, JSON, HTML);
- :mod:`soxs_archive.edps`: the EDPS workflow module, generated from the same declarations;
- :mod:`soxs_archive.cli`: ``soxs-reduce``.

The data model shared by these stages is in :mod:`soxs_archive.model`.
"""
