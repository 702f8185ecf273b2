"""Models: building, saving and loading, the monotone constructions and their certificate, the activation."""
