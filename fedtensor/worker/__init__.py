"""The worker layer: the actor that runs allow-listed commands, and its websocket server.

It imports the protocol and network layers, never the client.
"""
