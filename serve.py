"""`make run`: the service on http://127.0.0.1:PORT under gunicorn, as the Procfile runs it.

With an API key configured it talks to the real upstream. Without one it starts the bundled
emulator beside it and runs in demo mode, saying so loudly.
"""

import os
import subprocess
import sys

from config import ConfigError, load_settings

DEMO_BANNER = """
==========================================================================
  DEMO MODE: no API key is configured (API_KEYS_1), so the service talks
  to the bundled offline emulator at {emulator}.
  Pictures are placeholders that show their prompt. Nothing is paid for.
  Put API_KEYS_1=... in .env to use the real NanoBanana API.

  Open http://127.0.0.1:{port}/ to try it in your browser, or
  http://127.0.0.1:{port}/nanobanana?prompt=a+cat&user_id=me
  then http://127.0.0.1:{port}/nanobanana?prompt=make+it+blue&user_id=me
==========================================================================
"""


def main() -> None:
    try:
        settings = load_settings()
    except ConfigError as error:
        sys.exit(f"Configuration error: {error}")
    env = dict(os.environ)
    emulator = None
    if not settings.configured:
        emulator_port = settings.port + 1
        emulator_base = f"http://127.0.0.1:{emulator_port}"
        command = [sys.executable, "emulator.py", "--port", str(emulator_port), "--delay", "3"]
        if settings.database_path != ":memory:":  # its pictures kept beside the service's records, for restarts
            folder = os.path.dirname(os.path.abspath(settings.database_path))
            command += ["--state", os.path.join(folder, "emulator-tasks.jsonl")]
        emulator = subprocess.Popen(command)
        env.update(API_KEYS_1="demo-key", NANOBANANA_API_BASE=emulator_base)
        print(DEMO_BANNER.format(emulator=emulator_base, port=settings.port), flush=True)
    command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]
    command += ["--bind", f"127.0.0.1:{settings.port}", "app:create_app()"]
    try:
        subprocess.run(command, env=env)
    except KeyboardInterrupt:
        pass
    finally:
        if emulator:
            emulator.terminate()


if __name__ == "__main__":
    main()
