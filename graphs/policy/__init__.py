"""The policy core: Bayesian network, expected utility and value of information, the domain pack, the
dialogue state and the simulator. numpy, networkx, pydantic and yaml only: no Ray, no torch, no serving."""
