"""Settings of the service, read once from the environment (and a `.env` file).

`load_settings()` is the only place that reads `os.environ`. A bad value stops
start-up with a `ConfigError` whose message names the variable and says how to fix it.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import limits
from dotenv import dotenv_values

CALLBACK_FALLBACK_POLLS = 3  # with callbacks on, polls spread over the window, for a callback that never comes
WEBHOOK_RETRY_DELAYS = (5.0, 30.0, 120.0, 600.0, 3600.0, 21600.0)  # after each failed attempt, then given up
REQUEST_LINE_LIMIT = 256 * 1024  # a GET may carry a 20,000-character prompt: about 240 KB percent-encoded
BODY_TIMEOUT = 10.0  # seconds a request body has to arrive
MAX_BODY_BYTES = 1024 * 1024  # the largest request body, on every route but uploads (UPLOAD_MAX_BYTES)
UPLOAD_PATH = "/nanobanana/uploads"  # the one route whose body is a picture, with its own size and time limits
UPLOAD_FORM_ROOM = 64 * 1024  # an upload form's boundaries and part headers, beyond the picture itself
UPLOAD_BODY_TIMEOUT = 120.0  # seconds an upload has to arrive: 10 MB from a phone on a slow line
TASK_TTL = 24 * 3600  # how long the ledger keeps a task
IDEMPOTENCY_TTL = 24 * 3600  # how long an idempotency key names its task


def in_words(seconds: float) -> str:
    """A duration as a message says it: "24 hours", "10 seconds"."""
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} seconds"


def size_in_words(size: int) -> str:
    """A size as a message says it: "1 MiB", "10 MB", "256 KiB"."""
    for unit, factor in (("MiB", 2**20), ("MB", 10**6), ("KiB", 2**10), ("KB", 10**3)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


@dataclass(frozen=True)
class Pacing:
    """How fast the service may start tasks at the upstream, per API key (CONTRACT §11); None: no limit."""

    rate: int | None = 20  # submissions per key in any `window` seconds
    window: float = 10.0
    max_running: int | None = 100  # tasks per key submitted and not yet ended
    # Until its answer comes, a submission counts as reaching the upstream as late as it could: this long after
    # its turn was taken (retries included). Once answered, it counts as reaching it when the answer came.
    longest_submission: float = 120.0

    @property
    def spacing(self) -> float:
        """The window as counted here: a little longer than the upstream's, because a submission reaches it a
        moment after its turn is taken here, and two may be held up differently on the way."""
        return self.window + min(0.5, self.window / 10)


class ConfigError(ValueError):
    """A setting has a value the service cannot use."""


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...] = ()
    api_base: str = "https://api.nanobananaapi.ai"
    credit_path: str = "/api/v1/common/credit"
    poll_interval: float = 2.0
    poll_max_attempts: int = 30
    port: int = 8000
    web_concurrency: int = 1
    redis_url: str | None = None
    database_url: str | None = None  # names the store: PostgreSQL's address, or sqlite:///path
    database_path: str = "data/nanobanana.sqlite3"  # the SQLite store, when no other is named
    public_base_url: str | None = None
    proxy_hops: int = 1  # proxies in front that add X-Forwarded-*; 0: those headers are ignored
    webhook_secret: str | None = field(default=None, repr=False)  # whsec_…: signs webhooks to callers
    webhook_allow_private: bool = False
    webhook_retry_delays: tuple[float, ...] = WEBHOOK_RETRY_DELAYS
    webhook_timeout: float = 15.0  # seconds an attempt may take before it counts as failed
    media_store: str | None = None  # None, "local" or "s3://bucket/prefix": where lasting copies of pictures go
    media_dir: str = "data/media"
    s3_endpoint_url: str | None = None
    upload_max_bytes: int = 10 * 1000 * 1000  # the largest picture POST /nanobanana/uploads takes
    telegram_bot_token: str | None = field(default=None, repr=False)  # turns the Telegram bot on
    telegram_webhook_secret: str | None = field(default=None, repr=False)
    telegram_api_base: str = "https://api.telegram.org"
    discord_application_id: str | None = None  # with discord_public_key, turns the Discord bot on
    discord_public_key: str | None = None  # hex; checks each interaction's Ed25519 signature
    discord_bot_token: str | None = field(default=None, repr=False)  # lets start-up register the /banana command
    discord_api_base: str = "https://discord.com/api/v10"
    slack_signing_secret: str | None = field(default=None, repr=False)  # turns the Slack command on
    access_tokens: tuple[str, ...] = field(default=(), repr=False)
    rate_limit: str | None = "20/minute"  # None: off
    metrics_dir: str | None = None  # PROMETHEUS_MULTIPROC_DIR: metrics of several workers, summed
    history_ttl: int = 604800
    history_max_users: int = 10000
    connect_timeout: float = 5.0
    submit_read_timeout: float = 30.0
    poll_read_timeout: float = 10.0
    submit_retry_backoff: float = 0.5  # seconds before the first retry; doubled for the second
    upstream_rate: tuple[int, float] | None = (20, 10.0)  # submissions per key per window of seconds; None: off
    upstream_max_running: int | None = 100  # tasks per key submitted and not yet ended; None: off
    queue_max_wait: float = 900.0  # seconds a task may wait in the queue before it fails, nothing paid
    queue_max: int = 5000  # tasks queued at most; a new generation beyond gets 503
    demo: bool = False  # DEMO_MODE: `make run` started the bundled emulator because no key was configured

    @property
    def configured(self) -> bool:
        return bool(self.api_keys)

    @property
    def callbacks(self) -> bool:
        """With a public address, the upstream calls back when a task ends."""
        return self.public_base_url is not None

    @property
    def polling_window(self) -> float:
        """Seconds a request may wait for its picture: POLL_INTERVAL × POLL_MAX_ATTEMPTS."""
        return self.poll_interval * self.poll_max_attempts

    @property
    def poll_schedule(self) -> tuple[float, int]:
        """Seconds between two polls, and polls in a task's life: sparse when callbacks bring the results."""
        if self.callbacks:
            return self.polling_window / CALLBACK_FALLBACK_POLLS, CALLBACK_FALLBACK_POLLS
        return self.poll_interval, self.poll_max_attempts

    def __repr__(self) -> str:  # never print the keys themselves
        return f"Settings(api_keys=<{len(self.api_keys)} keys>, api_base={self.api_base!r}, store={self.store_name!r})"

    @property
    def pacing(self) -> Pacing:
        count, window = self.upstream_rate or (None, 1.0)
        longest = 3 * (self.connect_timeout + self.submit_read_timeout)  # the client sends one at most three times
        return Pacing(count, window, self.upstream_max_running, longest)

    @property
    def store_name(self) -> str:
        """Which store keeps the ledger: the one DATABASE_URL names, else Redis, else the SQLite file."""
        if self.database_url:
            return "postgres" if self.postgres_url else "sqlite"
        return "redis" if self.redis_url else "sqlite"

    @property
    def postgres_url(self) -> str | None:
        return self.database_url if self.database_url and not self.database_url.startswith("sqlite:") else None


def load_settings(environ: Mapping[str, str] | None = None, env_file: str | None = ".env") -> Settings:
    """Build the settings from `environ` (default: the process environment) over a `.env` file."""
    values: dict[str, str] = {}
    if env_file and os.path.exists(env_file):
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ if environ is None else environ)
    return _parse(values)


DEFAULTS = Settings()


def _parse(env: Mapping[str, str]) -> Settings:
    database_url, database_path = _database(env)
    settings = Settings(
        api_keys=_api_keys(env),
        api_base=_url(env, "NANOBANANA_API_BASE", DEFAULTS.api_base),
        credit_path=_text(env, "NANOBANANA_CREDIT_PATH", DEFAULTS.credit_path),
        poll_interval=_number(env, "POLL_INTERVAL", DEFAULTS.poll_interval, minimum=0.01),
        poll_max_attempts=_integer(env, "POLL_MAX_ATTEMPTS", DEFAULTS.poll_max_attempts, minimum=1),
        port=_integer(env, "PORT", DEFAULTS.port, minimum=1, maximum=65535),
        web_concurrency=_integer(env, "WEB_CONCURRENCY", DEFAULTS.web_concurrency, minimum=1),
        redis_url=_redis_url(env),
        database_url=database_url,
        database_path=database_path,
        public_base_url=_url(env, "PUBLIC_BASE_URL", None),
        proxy_hops=_integer(env, "PROXY_HOPS", DEFAULTS.proxy_hops, minimum=0, maximum=10),
        webhook_secret=_webhook_secret(env),
        webhook_allow_private=_flag(env, "WEBHOOK_ALLOW_PRIVATE"),
        webhook_retry_delays=_delays(env, "WEBHOOK_RETRY_DELAYS", DEFAULTS.webhook_retry_delays),
        webhook_timeout=_number(env, "WEBHOOK_TIMEOUT", DEFAULTS.webhook_timeout, minimum=0.1),
        media_store=_media_store(env),
        media_dir=_text(env, "MEDIA_DIR", DEFAULTS.media_dir),
        s3_endpoint_url=_url(env, "S3_ENDPOINT_URL", None),
        upload_max_bytes=_integer(env, "UPLOAD_MAX_BYTES", DEFAULTS.upload_max_bytes, minimum=1024),
        **_telegram(env),
        **_discord(env),
        slack_signing_secret=env.get("SLACK_SIGNING_SECRET", "").strip() or None,
        access_tokens=tuple(t.strip() for t in env.get("ACCESS_TOKENS", "").split(",") if t.strip()),
        rate_limit=_rate_limit(env),
        metrics_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or None,
        history_ttl=_integer(env, "HISTORY_TTL", DEFAULTS.history_ttl, minimum=1),
        history_max_users=_integer(env, "HISTORY_MAX_USERS", DEFAULTS.history_max_users, minimum=1),
        upstream_rate=_upstream_rate(env),
        upstream_max_running=_optional_integer(env, "UPSTREAM_MAX_RUNNING", DEFAULTS.upstream_max_running),
        queue_max_wait=_number(env, "QUEUE_MAX_WAIT", DEFAULTS.queue_max_wait, minimum=1),
        queue_max=_integer(env, "QUEUE_MAX", DEFAULTS.queue_max, minimum=1),
        demo=_flag(env, "DEMO_MODE"),
    )
    return settings


def _api_keys(env: Mapping[str, str]) -> tuple[str, ...]:
    """API_KEYS_1, API_KEYS_2, … in the order of their number; blank ones are skipped."""
    numbered = []
    for name, value in env.items():
        match = re.fullmatch(r"API_KEYS_(\d+)", name)
        if match and value.strip():
            numbered.append((int(match.group(1)), value.strip()))
    return tuple(key for _, key in sorted(numbered))


def _rate_limit(env: Mapping[str, str]) -> str | None:
    value = env.get("RATE_LIMIT", "").strip() or DEFAULTS.rate_limit
    if value.lower() == "off":
        return None
    try:
        limits.parse_many(value)
    except ValueError:
        raise ConfigError(
            f"RATE_LIMIT={value!r} is not a rate limit; use one like 20/minute, 100 per hour, or off"
        ) from None
    return value


def _upstream_rate(env: Mapping[str, str]) -> tuple[int, float] | None:
    value = env.get("UPSTREAM_RATE", "").strip().lower()
    if not value:
        return DEFAULTS.upstream_rate
    if value == "off":
        return None
    match = re.fullmatch(r"(\d+)\s*/\s*(\d+(?:\.\d+)?)\s*s", value)
    if not match or int(match.group(1)) < 1 or float(match.group(2)) <= 0:
        raise ConfigError(
            f"UPSTREAM_RATE={value!r} must be submissions per key per window of seconds, like 20/10s, or off"
        )
    return int(match.group(1)), float(match.group(2))


def _optional_integer(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    if env.get(name, "").strip().lower() == "off":
        return None
    return _integer(env, name, default, minimum=1)


def _webhook_secret(env: Mapping[str, str]) -> str | None:
    value = env.get("WEBHOOK_SECRET", "").strip()
    if not value:
        return None
    try:
        key = base64.b64decode(value.removeprefix("whsec_") + "==", validate=False)
    except (binascii.Error, ValueError):
        key = b""
    if not value.startswith("whsec_") or len(key) < 16:
        raise ConfigError(
            "WEBHOOK_SECRET must be whsec_ followed by at least 16 random bytes in base64; make one with: "
            "python3 -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
        )
    return value


def _telegram(env: Mapping[str, str]) -> dict:
    token = env.get("TELEGRAM_BOT_TOKEN", "").strip() or None
    secret = env.get("TELEGRAM_WEBHOOK_SECRET", "").strip() or None
    if token and not re.fullmatch(r"\d+:[A-Za-z0-9_-]{20,}", token):
        raise ConfigError(
            "TELEGRAM_BOT_TOKEN does not look like a bot token (123456:ABC…); copy it again from BotFather"
        )
    if token and not secret:
        raise ConfigError(
            "TELEGRAM_BOT_TOKEN needs TELEGRAM_WEBHOOK_SECRET: 1 to 256 letters, digits, _ or -, made up by you, "
            "so that only Telegram can send the bot updates"
        )
    if secret and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
        raise ConfigError("TELEGRAM_WEBHOOK_SECRET must be 1 to 256 letters, digits, _ or -")
    base = _url(env, "TELEGRAM_API_BASE", DEFAULTS.telegram_api_base)
    return {"telegram_bot_token": token, "telegram_webhook_secret": secret, "telegram_api_base": base}


def _discord(env: Mapping[str, str]) -> dict:
    application = env.get("DISCORD_APPLICATION_ID", "").strip() or None
    public_key = env.get("DISCORD_PUBLIC_KEY", "").strip().lower() or None
    if application and not re.fullmatch(r"\d{5,25}", application):
        raise ConfigError("DISCORD_APPLICATION_ID must be the application's number, from the Discord developer portal")
    if public_key and not re.fullmatch(r"[0-9a-f]{64}", public_key):
        raise ConfigError("DISCORD_PUBLIC_KEY must be the 64 hexadecimal characters of the portal's 'Public Key'")
    if bool(application) != bool(public_key):
        raise ConfigError("DISCORD_APPLICATION_ID and DISCORD_PUBLIC_KEY turn the Discord bot on together: set both")
    return {
        "discord_application_id": application,
        "discord_public_key": public_key,
        "discord_bot_token": env.get("DISCORD_BOT_TOKEN", "").strip() or None,
        "discord_api_base": _url(env, "DISCORD_API_BASE", DEFAULTS.discord_api_base),
    }


def _media_store(env: Mapping[str, str]) -> str | None:
    value = env.get("MEDIA_STORE", "").strip()
    if not value:
        return None
    if value == "local" or re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?", value):
        return value
    raise ConfigError(f"MEDIA_STORE={value!r} must be local, or s3://bucket/prefix (like s3://my-pictures/nanobanana)")


def _flag(env: Mapping[str, str], name: str) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name}={value!r} must be 1 (on) or 0 (off)")


def _delays(env: Mapping[str, str], name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        delays = tuple(float(part) for part in raw.split(","))
    except ValueError:
        delays = ()
    if not delays or not all(math.isfinite(d) and d >= 0 for d in delays):
        raise ConfigError(f"{name}={raw!r} must be seconds separated by commas, like 5,30,120")
    return delays


def _database(env: Mapping[str, str]) -> tuple[str | None, str]:
    """DATABASE_URL: PostgreSQL's address (postgres:// as PaaS add-ons give it, or postgresql://), or
    sqlite:///path for the embedded store; else DATABASE_PATH. DATABASE_URL, and the SQLite file's path."""
    value = env.get("DATABASE_URL", "").strip()
    path = _text(env, "DATABASE_PATH", DEFAULTS.database_path)
    if not value:
        return None, path
    if re.match(r"postgres(ql)?://", value):
        return value, path
    if value.startswith("sqlite:///") and len(value) > len("sqlite:///"):
        return value, value.removeprefix("sqlite:///")
    raise ConfigError(
        "DATABASE_URL must start with postgres://, postgresql:// or sqlite:///, like "
        "postgresql://user:password@host:5432/name or sqlite:///data/nanobanana.sqlite3"
    )


def _redis_url(env: Mapping[str, str]) -> str | None:
    value = env.get("REDIS_URL", "").strip()
    if value and not re.match(r"(rediss?|unix)://", value):
        raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://, like redis://localhost:6379/0")
    return value or None


def _text(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def _url(env: Mapping[str, str], name: str, default: str | None) -> str | None:
    value = (env.get(name, "").strip() or default or "").rstrip("/")
    if not value:
        return None
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", value):
        raise ConfigError(
            f"{name}={value!r} is not a web address; use one like {default or 'https://banana.example.com'}"
        )
    return value


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number; use a value like {default}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name}={raw!r} must be a number of at least {minimum}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number; use a value like {default}") from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and at most {maximum}" if maximum is not None else ""
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}{upper}")
    return value
