"""Thin library behind the notebooks and the ``roda`` command: RoDA (robust Sinkhorn test-time adaptation
of a PatchCore memory bank) and DPDL (distribution-prototype diffusion learning for open-set supervised AD).

Modules are named after what they hold and sit in four layers (base -> algorithms -> runners -> reporting,
plus the run configuration); docs/architecture.md has one line per module and tests/test_layout.py keeps the
layering. Names of tasks, corruptions and methods resolve in :mod:`lib.common.registry`.
"""

__version__ = "0.12.0"
