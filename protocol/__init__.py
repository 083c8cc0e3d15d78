"""What the server and the agent must agree on: request signing and the wire paths (docs/protocol.md).

Shipped with both programs and importing neither: the agent on a GPU host needs
only this package, `requests` and itsdangerous.
"""
