"""Settings from the environment and `.env`: defaults, key order, one clear line per bad value."""

from __future__ import annotations

import pytest

from config import ConfigError, load_settings


def settings_from(**environ):
    return load_settings(environ, env_file=None)


def test_defaults_match_the_contract():
    settings = settings_from()
    assert settings.api_keys == ()
    assert not settings.configured
    assert settings.api_base == "https://api.nanobananaapi.ai"
    assert (settings.poll_interval, settings.poll_max_attempts) == (2.0, 30)
    assert settings.polling_window == 60.0
    assert (settings.port, settings.web_concurrency) == (8000, 1)
    assert (settings.history_ttl, settings.history_max_users) == (604800, 10000)


def test_keys_in_the_order_of_their_number():
    settings = settings_from(API_KEYS_10="ten", API_KEYS_2="two", API_KEYS_1="one", API_KEYS_3=" ")
    assert settings.api_keys == ("one", "two", "ten")


def test_keys_never_appear_in_repr():
    assert "secret-value" not in repr(settings_from(API_KEYS_1="secret-value"))


def test_float_poll_interval():
    assert settings_from(POLL_INTERVAL="0.05").poll_interval == 0.05


def test_environment_wins_over_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("API_KEYS_1=from-file\nPOLL_INTERVAL=3\n")
    settings = load_settings({"POLL_INTERVAL": "1"}, env_file=str(env_file))
    assert settings.api_keys == ("from-file",)
    assert settings.poll_interval == 1.0


@pytest.mark.parametrize(
    "name, value",
    [
        ("POLL_INTERVAL", "fast"),
        ("POLL_INTERVAL", "-1"),
        ("POLL_INTERVAL", "nan"),
        ("POLL_MAX_ATTEMPTS", "2.5"),
        ("POLL_MAX_ATTEMPTS", "0"),
        ("PORT", "http"),
        ("PORT", "70000"),
        ("HISTORY_TTL", "a week"),
        ("HISTORY_MAX_USERS", "0"),
        ("NANOBANANA_API_BASE", "api.nanobananaapi.ai"),
        ("WEB_CONCURRENCY", "many"),
        ("RATE_LIMIT", "lots"),
        ("RATE_LIMIT", "20/fortnight"),
        ("PUBLIC_BASE_URL", "banana.example.com"),
    ],
)
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(ConfigError) as caught:
        settings_from(**{name: value})
    message = str(caught.value)
    assert message.startswith(name) and "\n" not in message


def test_several_workers_work_with_every_store():
    assert settings_from(WEB_CONCURRENCY="2").store_name == "sqlite"
    settings = settings_from(WEB_CONCURRENCY="2", REDIS_URL="redis://localhost:6379/0")
    assert settings.web_concurrency == 2 and settings.redis_url == "redis://localhost:6379/0"
    assert settings_from(WEB_CONCURRENCY="2", DATABASE_URL="postgres://u:p@db.example:5432/d").web_concurrency == 2


@pytest.mark.parametrize(
    "url, store, path",
    [
        ("postgres://user:secret-pw@db.example:5432/banana", "postgres", "data/nanobanana.sqlite3"),
        ("postgresql://user:secret-pw@db.example/banana?sslmode=require", "postgres", "data/nanobanana.sqlite3"),
        ("sqlite:///var/lib/banana.sqlite3", "sqlite", "var/lib/banana.sqlite3"),
        ("sqlite:////var/lib/banana.sqlite3", "sqlite", "/var/lib/banana.sqlite3"),
    ],
)
def test_database_url_names_the_store(url, store, path):
    settings = settings_from(DATABASE_URL=url, REDIS_URL="redis://localhost:6379/0")  # Redis then keeps counters
    assert (settings.store_name, settings.database_path) == (store, path)
    assert "secret-pw" not in repr(settings)


def test_database_url_must_name_a_database_this_service_knows():
    with pytest.raises(ConfigError, match="DATABASE_URL must start with postgres://"):
        settings_from(DATABASE_URL="mysql://user@db/banana")


def test_redis_url_must_be_a_redis_address():
    with pytest.raises(ConfigError, match="REDIS_URL"):
        settings_from(REDIS_URL="localhost:6379")


def test_access_tokens_and_rate_limit():
    settings = settings_from(ACCESS_TOKENS=" alpha, beta ,", RATE_LIMIT="5 per hour")
    assert settings.access_tokens == ("alpha", "beta")
    assert settings.rate_limit == "5 per hour"
    assert "alpha" not in repr(settings)
    assert settings_from().rate_limit == "20/minute"
    assert settings_from(RATE_LIMIT="off").rate_limit is None


def test_the_discord_bot_needs_its_application_and_its_public_key():
    key = "ab" * 32
    settings = settings_from(DISCORD_APPLICATION_ID="112233445566778899", DISCORD_PUBLIC_KEY=key.upper())
    assert (settings.discord_public_key, settings.discord_bot_token) == (key, None)
    with pytest.raises(ConfigError, match="set both"):
        settings_from(DISCORD_PUBLIC_KEY=key)
    with pytest.raises(ConfigError, match="DISCORD_PUBLIC_KEY must be"):
        settings_from(DISCORD_APPLICATION_ID="112233445566778899", DISCORD_PUBLIC_KEY="not-a-key")
    assert "secret-bot" not in repr(settings_from(DISCORD_BOT_TOKEN="secret-bot"))
