"""``quantad bench``: sweep quanta and policies over a workload, against FIFO and a peer server.

Client-side only: it starts ``quantad serve`` (and ``transformers serve``) as subprocesses and
talks to them over their sockets, so nothing here imports torch.  Entry point: ``runner.run``.
"""
