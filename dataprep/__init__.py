"""Data preparation: datatrove steps from raw text to clean documents, BPE training and token shards."""
