"""Operator tools: quorumctl."""
