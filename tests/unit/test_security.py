"""Security: token parsing and comparison, without servers (the rest:
tests/integration/test_security.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferpool.api.auth import BearerAuth, load_tokens, parse_tokens
from inferpool.settings import Settings, SettingsError

pytestmark = pytest.mark.timeout(120)

ALICE = "alice-0123456789abcdef0123456789abcdef"

BOB = "bob-fedcba9876543210fedcba9876543210"

WRONG = "alice-0123456789abcdef0123456789abcdeX"  # one character off ALICE


def test_token_parsing_names_entries_never_values(tmp_path: Path) -> None:
    assert parse_tokens(f"a:{ALICE}\n# c\nb:{BOB}", "f") == {ALICE.encode(): "a", BOB.encode(): "b"}
    assert parse_tokens(f"a:{ALICE}, b:{BOB}", "env", ",") == {ALICE.encode(): "a", BOB.encode(): "b"}
    for bad in (ALICE, f"a:{ALICE}\na:{BOB}", f"a:{ALICE}\nb:{ALICE}", "a:short", f"a:{ALICE} x"):
        with pytest.raises(SettingsError) as info:
            parse_tokens(bad, "f")
        assert ALICE not in str(info.value) and BOB not in str(info.value) and "short" not in str(info.value)
    settings = Settings.from_env({"INFERPOOL_AUTH_TOKENS": f"a:{ALICE}"})
    assert ALICE not in repr(settings)
    assert load_tokens(settings) == {ALICE.encode(): "a"}
    with pytest.raises(SettingsError, match="INFERPOOL_AUTH_TOKENS_FILE"):
        Settings.from_env({"INFERPOOL_AUTH_TOKENS_FILE": str(tmp_path / "missing")})
    with pytest.raises(SettingsError, match="INFERPOOL_TLS_CERT_FILE"):
        Settings.from_env({"INFERPOOL_TLS_CERT_FILE": str(tmp_path / "missing.pem")})


def test_bearer_compare_checks_every_token() -> None:
    auth = BearerAuth({ALICE.encode(): "alice", BOB.encode(): "bob"})
    assert auth.identify([("authorization", f"Bearer {ALICE}")]) == "alice"
    assert auth.identify([("authorization", f"bearer {BOB}")]) == "bob"
    for header in (f"Bearer {WRONG}", f"Basic {ALICE}", ALICE, "Bearer ", f"Bearer {ALICE[:-1]}"):
        assert auth.identify([("authorization", header)]) is None, header
    assert auth.identify([]) is None
