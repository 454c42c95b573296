"""One module per study (and its helpers): evaluate, lesion, noise, attacks, train, paths, features."""
