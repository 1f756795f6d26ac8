"""Planning library: load a model, group it into layers, profile, optimize and split."""
