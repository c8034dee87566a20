"""The load benchmark (``distload bench``): distload against the ways users load today.

``driver`` builds a synthetic checkpoint, measures the storage limit, and starts each method
under torchrun (one node, or two simulated nodes each reading its own copy of the checkpoint);
``worker`` is one rank of one run; ``methods`` holds the loading methods compared.
"""
