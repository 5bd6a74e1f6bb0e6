"""The federated layer: data sets over workers, training rounds, strategies.

It is written against the client layer's pointers and handles, and sends only plans and
allow-listed worker operations.
"""
