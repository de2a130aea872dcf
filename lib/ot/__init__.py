"""Entropic optimal transport: Sinkhorn solvers, transport costs, the discretisation of RoDA Eq. 6, Hungarian
assignment and the label-free choice of epsilon."""
