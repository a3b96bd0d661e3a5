"""quorumkv's wire protocol: limits, error codes, codec, request schemas and the client."""
