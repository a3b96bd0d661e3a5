"""quorumkv's server: the actor processes of one node and their pure cores."""
