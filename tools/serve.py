"""`make run`: the service on http://127.0.0.1:PORT under gunicorn, as the Procfile runs it.

With an API key configured it talks to the real upstream. Without one it starts the bundled
emulator beside it and runs in demo mode, saying so loudly. Stopping it (Ctrl+C, or SIGTERM)
stops everything it started.
"""

import base64
import errno
import os
import secrets
import signal
import socket
import subprocess
import sys

from config import ConfigError, load_settings

DEMO_BANNER = """
==========================================================================
  DEMO MODE: no API key is configured (API_KEYS_1), so the service talks
  to the bundled offline emulator at {emulator}.
  Pictures are placeholders that show their prompt. Nothing is paid for.
  The emulator calls the service back the moment a picture is ready,
  so an answer comes as soon as its picture (3 seconds here). Pictures
  are copied to the service's own folder (MEDIA_STORE=local).
  Put API_KEYS_1=... in .env to use the real NanoBanana API.

  Open http://127.0.0.1:{port}/ to try it in your browser, or
  http://127.0.0.1:{port}/nanobanana?prompt=a+cat&user_id=me
  then http://127.0.0.1:{port}/nanobanana?prompt=make+it+blue&user_id=me
{webhooks}==========================================================================
"""
WEBHOOK_NOTE = """
  Webhooks (callback_url=...) are signed for this session with
  WEBHOOK_SECRET={secret}
  (set your own in .env to keep one across restarts)
"""


class Stop(Exception):
    """SIGTERM: stop like Ctrl+C does."""


def main() -> None:
    try:
        settings = load_settings()
    except ConfigError as error:
        sys.exit(f"Configuration error: {error}")
    demo = not settings.configured
    for port in [settings.port, settings.port + 1] if demo else [settings.port]:
        if in_use(port):
            sys.exit(
                f"Port {port} is already in use (another `make run`?). Stop that, or choose a port: PORT=8080 make run"
            )
    signal.signal(signal.SIGTERM, stop)
    started: list[subprocess.Popen] = []
    code = 0
    try:
        env = dict(os.environ)
        if demo:
            emulator_base = f"http://127.0.0.1:{settings.port + 1}"
            started.append(subprocess.Popen(emulator_command(settings)))
            env.update(demo_environment(settings, emulator_base))
            webhooks = ""
            if not settings.webhook_secret:  # so that callback_url can be tried in demo mode too
                env["WEBHOOK_SECRET"] = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
                webhooks = WEBHOOK_NOTE.format(secret=env["WEBHOOK_SECRET"])
            print(DEMO_BANNER.format(emulator=emulator_base, port=settings.port, webhooks=webhooks), flush=True)
        command = [sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py"]
        started.append(
            subprocess.Popen([*command, "--bind", f"127.0.0.1:{settings.port}", "app:create_app()"], env=env)
        )
        code = started[-1].wait()
    except (KeyboardInterrupt, Stop):
        code = 0
    finally:
        for process in reversed(started):
            end(process)
    sys.exit(code)


def demo_environment(settings, emulator_base: str) -> dict[str, str]:
    """The service's settings in demo mode: the emulator's key and address, said to be a demo; unless the owner set
    them, this machine's own address as the public one, so the emulator calls back the moment a picture is ready
    (and can fetch uploads) instead of the service polling every 2 seconds, and pictures copied to the local
    folder, so the page's Download links save them (a browser saves only what comes from the page's own origin)."""
    return {
        "API_KEYS_1": "demo-key",
        "NANOBANANA_API_BASE": emulator_base,
        "DEMO_MODE": "1",
        "PUBLIC_BASE_URL": settings.public_base_url or f"http://127.0.0.1:{settings.port}",
        "MEDIA_STORE": settings.media_store or "local",
    }


def emulator_command(settings) -> list[str]:
    command = [sys.executable, "-m", "tools.emulator", "--port", str(settings.port + 1), "--delay", "3"]
    if settings.database_path != ":memory:":  # its pictures kept beside the service's records, for restarts
        folder = os.path.dirname(os.path.abspath(settings.database_path))
        command += ["--state", os.path.join(folder, "emulator-tasks.jsonl")]
    return command


def in_use(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            return error.errno == errno.EADDRINUSE
    return False


def stop(signum, frame) -> None:
    raise Stop()


def end(process: subprocess.Popen) -> None:
    """Stop a child gracefully (it lets waiting requests finish); at once if asked again, or after a while."""
    try:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=120)
    except (subprocess.TimeoutExpired, KeyboardInterrupt, Stop):
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
