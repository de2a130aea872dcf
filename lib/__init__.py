"""Thin library behind the notebooks: RoDA (robust Sinkhorn test-time adaptation of a PatchCore
memory bank) and DPDL (distribution-prototype diffusion learning for open-set supervised AD).

Modules, each named after what it holds:

- ``utils``        seeding, devices, atomic writes, progress bars
- ``data``         MVTec / labelled-folder / ELPV loaders, preprocessing, splits, download helper
- ``synthetic``    a small deterministic MVTec-layout set with masks (tests and the smoke profile)
- ``corruptions``  seeded image corruptions (imagecorruptions, with fixes for its 1.1.2 failures)
- ``backbones``    ImageNet-pretrained feature extractors that install offline, plus torchvision ones
- ``patchcore``    patch features, approximate greedy coreset, memory bank, scoring
- ``metrics``      image / pixel AUROC
- ``sinkhorn``     entropic OT solvers behind one ``method=`` switch (log, absorb, semi-relaxed, unbalanced), eps calibration
- ``transport``    costs and the discretization of RoDA Eq. 6 (re-exports the Sinkhorn entry points)
- ``alignment``    alignment losses: RoDA, continuous OT, Hungarian, TTT++, TTAC
- ``adaptation``   BatchNorm-affine test-time adaptation loop (RoDA Alg. 1)
- ``roda_runner``  RoDA experiment glue: configs, adapt-and-score runs, grids, diagnosis (notebooks 03/04/08)
- ``dpdl``         DPDL prototypes, Schrodinger bridge, dispersion loss, MIL heads
- ``openset``      the open-set supervised protocol (general / hard settings)
- ``openset_baselines``  DevNet, DRA composite heads and a focal-loss classifier under that protocol
- ``pipeline``     the steps the RoDA notebooks share (task, bank, split, evaluation)
- ``figures``      plotting helpers
- ``fidelity``     the paper-vs-ours verdicts of notebook 06
- ``download``     the official MVTec AD download with checksum (for users with internet)
- ``profiles``     run profiles for papermill (smoke, default, real, full)
"""

__version__ = "0.1.0"
