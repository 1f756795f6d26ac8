"""Planning: load a model, group it into layers, profile them, read the cluster spec, price
and optimize the split, describe it as a plan file, and split the model into stage artifacts.

No network I/O. The worker imports only the parts that read archives, run and profile a stage
(see README, "How it works").
"""
