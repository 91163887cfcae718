"""The HTTP service over the `Predictor`: `vseg serve` (see README "Serve").

- `service`  the served model: replicas per placement, loading, switching checkpoints without a restart
- `prepare`  decoding + processor encoding of requests before the queue, on threads or spawned processes
- `batcher`  dynamic batching of concurrent requests onto the replicas' worker threads
- `requests` request / response shapes (OpenAPI), limits, image decoding, path confinement
- `app`      the FastAPI routes, errors as 4xx JSON, token, the page at /
- `masks`    PNG / RLE / polygons, and corrected masks saved as `data=polygons` training data
- `jobs`     fine-tune jobs: train.py subprocesses with their state on disk
- `main`     the `vseg serve` command, and `Running` (a server on a thread, for tests and bench)
"""

from vseg.serve.main import Running, config_from_args, free_port, main

__all__ = ["Running", "config_from_args", "free_port", "main"]
