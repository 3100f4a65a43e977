"""dpi_top: a terminal view of the pipeline's figures in Redis (`python -m dpi_top`), for
operators without Docker or Grafana. snapshot.py reads (one pipeline per refresh), render.py
draws with rich, procs.py watches the processes a demo started."""
