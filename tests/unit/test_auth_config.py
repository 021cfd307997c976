"""Which auth and page-token settings a production (non-development) run insists on."""

from __future__ import annotations

import pytest
from helpers.tokens import TEST_JWT_SECRET

from userservice.config import ConfigError, load_settings

BASE = {
    "USERSERVICE_AUTH_JWT_SECRET": TEST_JWT_SECRET,
    "USERSERVICE_AUTH_ISSUER": "https://issuer.test",
    "USERSERVICE_AUTH_AUDIENCE": "userservice",
}


def settings_from(**environ: str) -> object:
    return load_settings({**BASE, **environ})


@pytest.mark.parametrize("missing", ["USERSERVICE_AUTH_ISSUER", "USERSERVICE_AUTH_AUDIENCE"])
def test_issuer_and_audience_are_required_outside_development(missing: str) -> None:
    with pytest.raises(ConfigError, match="USERSERVICE_AUTH_ALLOW_ANY_ISSUER_AUDIENCE"):
        settings_from(**{missing: ""})


def test_an_explicit_reason_opts_out_of_issuer_and_audience() -> None:
    reason = "tokens come from our own gateway, which strips iss and aud"
    settings = load_settings(
        {
            "USERSERVICE_AUTH_JWT_SECRET": TEST_JWT_SECRET,
            "USERSERVICE_AUTH_ALLOW_ANY_ISSUER_AUDIENCE": reason,
        }
    )
    assert settings.auth_allow_any_issuer_audience == reason


def test_development_needs_neither_issuer_nor_audience_nor_page_token_secret() -> None:
    settings = load_settings(
        {
            "USERSERVICE_DEV": "true",
            "USERSERVICE_AUTH_JWT_SECRET": TEST_JWT_SECRET,
            "USERSERVICE_DATABASE_URL": "postgresql://127.0.0.1/db",
        }
    )
    assert settings.dev


def test_migrate_needs_no_auth_settings() -> None:
    url = "postgresql://127.0.0.1/db"
    assert load_settings({"USERSERVICE_DATABASE_URL": url}, require_auth=False).database_url


def test_postgres_needs_a_page_token_secret_outside_development() -> None:
    with pytest.raises(ConfigError, match="USERSERVICE_PAGE_TOKEN_SECRET is required"):
        settings_from(USERSERVICE_DATABASE_URL="postgresql://127.0.0.1/db")
    settings_from(
        USERSERVICE_DATABASE_URL="postgresql://127.0.0.1/db",
        USERSERVICE_PAGE_TOKEN_SECRET="shared-page-token-secret",
    )
    # SQLite is one process: a random per-process key hurts no one.
    settings_from(USERSERVICE_DATABASE_URL="sqlite:///x.db")


def test_previous_page_token_secrets_need_a_current_one() -> None:
    with pytest.raises(ConfigError, match="needs USERSERVICE_PAGE_TOKEN_SECRET"):
        settings_from(USERSERVICE_PAGE_TOKEN_PREVIOUS_SECRETS="old")


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("https://idp.example.com/.well-known/jwks.json", True),
        ("http://127.0.0.1:8080/jwks.json", True),
        ("http://[::1]:8080/jwks.json", True),
        ("http://idp.example.com/jwks.json", False),
        ("file:///etc/jwks.json", False),
        ("https:///jwks.json", False),
    ],
)
def test_the_jwks_url_must_be_https_unless_loopback(url: str, accepted: bool) -> None:
    environ = {"USERSERVICE_AUTH_JWT_SECRET": "", "USERSERVICE_AUTH_JWKS_URL": url}
    if accepted:
        settings_from(**environ)
    else:
        with pytest.raises(ConfigError, match="USERSERVICE_AUTH_JWKS_URL must be an https://"):
            settings_from(**environ)


def test_only_one_key_source() -> None:
    with pytest.raises(ConfigError, match="set only one of"):
        settings_from(USERSERVICE_AUTH_JWKS_URL="https://idp.example.com/jwks.json")


def test_the_jwks_cache_bounds_are_ordered() -> None:
    with pytest.raises(ConfigError, match="MAX_CACHE_SECONDS must not be below"):
        settings_from(
            USERSERVICE_AUTH_JWKS_MIN_CACHE_SECONDS="600",
            USERSERVICE_AUTH_JWKS_MAX_CACHE_SECONDS="60",
        )
