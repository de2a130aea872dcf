"""Experiment glue: run profiles and their validation, the RoDA steps and grid, the parallel executor, the drifting
line and the ``roda`` command. Algorithms never import from here."""
