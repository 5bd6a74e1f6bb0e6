"""The protocol layer, sans I/O: what crosses a worker boundary and how it is written.

Messages (:mod:`.messages`), their wire codec (:mod:`.codec`), the allow-list of operation
names (:mod:`.ops`), plans as data (:mod:`.plan`), values and their copies
(:mod:`.values`), recycled buffers (:mod:`.pool`), chunking of large frames
(:mod:`.chunks`) and websocket framing (:mod:`.wsframes`). Nothing here opens a socket,
starts a task or imports another layer of fedtensor but :mod:`fedtensor.errors`.
"""
