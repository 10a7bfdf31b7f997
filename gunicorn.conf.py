"""gunicorn settings for the Procfile and `make run`.

One process with many threads: the in-memory history stays in one place, and a request that
waits a minute for its picture holds a thread, not a process. gthread's worker timeout only
watches the worker's main loop, so a request inside its wait is never killed for being slow.
"""

import logging
import sys

from config import ConfigError, load_settings

try:
    settings = load_settings()
except ConfigError as error:
    sys.exit(f"Configuration error: {error}")

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

bind = f"0.0.0.0:{settings.port}"
workers = settings.web_concurrency
worker_class = "gthread"
threads = 1024
worker_connections = 1200
# A restart lets every request finish its wait (and a slow submission) before the worker goes.
graceful_timeout = int(settings.polling_window + settings.submit_read_timeout + 10)
accesslog = "-"
# gunicorn's control socket lives at one path per user; instances on one machine would share it.
control_socket_disable = True
