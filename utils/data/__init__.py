"""Data: documents of each split (corpus), tokenizers and token files, hub fetching, train/held-out overlap."""
