"""RoDA: the PatchCore memory bank, the alignment losses of RoDA Tab. 1/4, BatchNorm statistics, test-time
adaptation of the encoder's BatchNorm affine parameters (Alg. 1) and its online variant."""
