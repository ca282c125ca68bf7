"""graphs/serving/auth.py: keys stored hashed, entries that name their line and field, the loopback rule,
token buckets on a controlled clock."""

from __future__ import annotations

import pytest

from coact.graphs.serving.auth import (
    ANONYMOUS,
    Authenticator,
    KeyFileError,
    TokenBucket,
    hash_key,
    is_loopback,
    load_keys,
    new_key,
    parse_keys,
)

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_keys_are_random_and_only_their_hash_is_kept(tmp_path) -> None:
    a, b = new_key(), new_key()
    assert a != b and len(a) > 40
    path = tmp_path / "keys"
    path.write_text(f"# team keys\nalice {hash_key(a)} rate_per_s=2 burst=3\nbob {hash_key(b)}  # no limits\n")
    keys = load_keys(str(path), environ={})
    assert [k.name for k in keys] == ["alice", "bob"]
    assert a not in path.read_text() and keys[0].rate_per_s == 2.0 and keys[0].burst == 3 and keys[1].burst is None


def test_environment_entries_and_duplicates(tmp_path) -> None:
    a, b = new_key(), new_key()
    keys = load_keys(None, environ={"COACT_API_KEYS": f"ci {hash_key(a)},ops {hash_key(b)} max_sessions=4"})
    assert [(k.name, k.max_sessions) for k in keys] == [("ci", None), ("ops", 4)]
    path = tmp_path / "keys"
    path.write_text(f"ci {hash_key(b)}\n")
    with pytest.raises(KeyFileError, match="same name ci"):
        load_keys(str(path), environ={"COACT_API_KEYS": f"ci {hash_key(a)}"})


@pytest.mark.parametrize(("line", "problem"), [
    ("alice", "expected '<name> sha256"),
    ("al ice sha256:" + "0" * 64, "hash"),
    ("alice sha256:abc", "hash: expected sha256"),
    ("alice coact-abcdef", "looks like a key itself"),
    ("al/ce sha256:" + "0" * 64, "name 'al/ce'"),
    ("alice sha256:" + "0" * 64 + " rate=3", "'rate=3': expected one of"),
    ("alice sha256:" + "0" * 64 + " burst=many", "burst: 'many' is not a number"),
    ("alice sha256:" + "0" * 64 + " rate_per_s=0", "rate_per_s: must be positive"),
])
def test_bad_entries_name_line_and_field(line: str, problem: str) -> None:
    with pytest.raises(KeyFileError) as err:
        parse_keys("# header\n\n" + line + "\n", "keys.txt")
    assert str(err.value).startswith("keys.txt:3: ") and problem in str(err.value)


def test_missing_keys_file_is_named(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="keys_file .*nope.* does not exist"):
        load_keys(str(tmp_path / "nope"), environ={})


@pytest.mark.parametrize(("host", "loop"), [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
                                            ("localhost", True), ("10.0.0.5", False), ("0.0.0.0", False),
                                            ("::", False), ("", False), (None, False), ("example.org", False)])
def test_loopback(host, loop: bool) -> None:
    assert is_loopback(host) is loop


def test_without_keys_only_loopback_is_served() -> None:
    auth = Authenticator([], rate_per_s=1, burst=1, max_sessions=10)
    assert not auth.enabled
    ok = auth.check(None, "127.0.0.1")
    assert ok.ok and ok.owner == ANONYMOUS
    refused = auth.check("Bearer anything", "192.168.1.20")
    assert refused.status == 403 and "loopback clients only" in refused.error and "192.168.1.20" in refused.error


def test_with_keys_every_request_needs_a_valid_bearer() -> None:
    secret = new_key()
    auth = Authenticator(parse_keys(f"alice {hash_key(secret)}", "k"), rate_per_s=100, burst=100, max_sessions=7)
    assert auth.check(f"Bearer {secret}", "10.1.2.3").owner == "alice"  # keys work from anywhere
    assert auth.check(f"bearer  {secret} ", "127.0.0.1").ok
    for header, problem in [(None, "missing API key"), ("Basic abc", "expected 'Bearer <key>'"),
                            ("Bearer", "expected 'Bearer <key>'"), ("Bearer " + new_key(), "invalid API key"),
                            (f"Bearer {secret}x", "invalid API key")]:
        v = auth.check(header, "127.0.0.1")  # loopback gets no pass once keys exist
        assert v.status == 401 and problem in v.error and v.headers["WWW-Authenticate"].startswith("Bearer")
    assert auth.check(f"Bearer {secret}", "127.0.0.1").max_sessions == 7


def test_token_bucket_refills_at_its_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0, 0, 0]
    assert bucket.take() == pytest.approx(0.5)  # empty: the next token in 1/rate
    clock.t += 0.5
    assert bucket.take() == 0
    clock.t += 100
    assert [bucket.take() == 0 for _ in range(4)] == [True, True, True, False]  # never above burst


def test_rate_limit_per_key_with_retry_after() -> None:
    clock = Clock()
    a, b = new_key(), new_key()
    keys = parse_keys(f"slow {hash_key(a)} rate_per_s=0.5 burst=2\nfast {hash_key(b)}", "k")
    auth = Authenticator(keys, rate_per_s=50, burst=50, max_sessions=3, clock=clock)
    assert auth.check(f"Bearer {a}", None).ok and auth.check(f"Bearer {a}", None).ok
    limited = auth.check(f"Bearer {a}", None)
    assert limited.status == 429 and limited.headers["Retry-After"] == "2" and "'slow'" in limited.error
    assert all(auth.check(f"Bearer {b}", None).ok for _ in range(20))  # another key has its own bucket
    clock.t += 2.0
    assert auth.check(f"Bearer {a}", None).ok
