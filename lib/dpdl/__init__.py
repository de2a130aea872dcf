"""DPDL: Gaussian prototypes and the Schrodinger-bridge closed forms, the DPDL model and losses, the open-set
supervised protocol, the training engine shared with DevNet / DRA / FLOS, and those baselines."""
