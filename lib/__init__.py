"""Thin library behind the notebooks: RoDA (robust Sinkhorn test-time adaptation of a PatchCore
memory bank) and DPDL (distribution-prototype diffusion learning for open-set supervised AD).

Modules, each named after what it holds:

- ``utils``        seeding, devices, atomic writes, progress bars
- ``data``         MVTec / labelled-folder / ELPV loaders, preprocessing, splits, download helper
- ``synthetic``    a small deterministic MVTec-layout set with masks (tests and the smoke profile)
- ``corruptions``  seeded image corruptions (imagecorruptions, with fixes for its 1.1.2 failures)
- ``backbones``    ImageNet-pretrained feature extractors that install offline, plus torchvision ones
- ``backbone_registry``  what each backbone is and where its weights come from (files, hashes)
- ``weight_ports``  the MobileNetV2, EfficientNet-Lite and Inception-v3 weight ports onto torchvision modules
- ``patchcore``    patch features, approximate greedy coreset, memory bank, scoring
- ``metrics``      image / pixel AUROC
- ``transport``    log-domain Sinkhorn and the discretization of RoDA Eq. 6
- ``alignment``    alignment losses: RoDA, continuous OT, Hungarian, TTT++, TTAC
- ``adaptation``   BatchNorm-affine test-time adaptation loop (RoDA Alg. 1)
- ``dpdl``         the DPDL model: bounded prototype losses, dispersion loss, MIL heads
- ``prototypes``   DPDL's Gaussian prototypes and the light Schrodinger bridge's closed forms
- ``openset``      the open-set supervised protocol (general / hard settings)
- ``openset_training``  the trunk, batch sampler and training loop every open-set method shares
- ``openset_maps`` cached backbone maps and the seeded augmentation pool of the open-set methods
- ``openset_baselines``  DevNet, DRA composite heads and a focal-loss classifier under that protocol
- ``pipeline``     the steps the RoDA notebooks share (task, bank, split, evaluation)
- ``figures``      plotting helpers
- ``fidelity``     the paper-vs-ours verdicts of notebook 06
- ``download``     the official MVTec AD download with checksum (for users with internet)
- ``grid``         a grid of independent runs, one atomic result file per cell, through Ray or serially
- ``profiles``     run profiles for papermill (smoke, default, real, full): one read-only resolved configuration
- ``settings``     what each profile setting may hold (type, range, choices), checked before a run starts
- ``cache``        cache keys from everything that built a file (banks, features), shifted images in memory
- ``stream``       online BatchNorm adaptation on a stream of batches, with a label-free guard
- ``line``         a simulated drifting inspection line (notebook 07)
- ``folders``      any folder of images as a dataset (grey/RGB/RGBA/16-bit), labels where they exist
- ``cli``          the ``roda`` command: fit / adapt / score / evaluate on folders of images
"""

__version__ = "0.1.0"
