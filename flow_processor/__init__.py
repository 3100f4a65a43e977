"""Flow processor: packet records from Kafka -> flows and per-second series in Redis."""

import os

# numpy's OpenBLAS starts a thread per core when numpy is imported; the service does no linear
# algebra (numpy works here on packed records and header bytes), so one is enough: less start
# time and CPU, and no idle threads on a many-core host. Set before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
