"""agent.uplink.keyfiles: private key permission checks, certificate expiry warnings, rotation watch."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from agent.errors import ConfigError, KeyFileError
from agent.schema import expand_credentials_path
from agent.uplink.keyfiles import FileWatcher, certificate_expiry_warning, check_private_key_file
from agent.dev.pki import init_ca, issue_client_cert

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


@pytest.fixture(autouse=True)
def _no_credentials_dir(monkeypatch) -> None:
    # The tests must not depend on being run from a systemd unit with credentials.
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def _key(tmp_path: Path, mode: int, name: str = "vin.key") -> Path:
    path = tmp_path / name
    path.write_text("-----BEGIN PRIVATE KEY-----\n")
    os.chmod(path, mode)
    return path


# --------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_pass(tmp_path: Path, mode: int) -> None:
    check_private_key_file(_key(tmp_path, mode), "mqtt.key")


@pytest.mark.parametrize("mode", [0o640, 0o644, 0o604, 0o660, 0o602, 0o610, 0o777])
def test_group_or_other_access_is_refused_with_the_mode(tmp_path: Path, mode: int) -> None:
    path = _key(tmp_path, mode)
    with pytest.raises(KeyFileError) as err:
        check_private_key_file(path, "mqtt.key")
    message = str(err.value)
    assert message == (f"{path}: mqtt.key is accessible by group/others (mode {mode:04o}); "
                       f"run: chmod 600 {path}")
    assert "\n" not in message


def test_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(KeyFileError, match=r"nope\.key: signing\.key not found$"):
        check_private_key_file(path, "signing.key")


def test_directory(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.mkdir(mode=0o700)
    with pytest.raises(KeyFileError) as err:
        check_private_key_file(path, "signing.key")
    assert str(err.value) == f"{path}: signing.key is not a regular file (a directory, mode 0700)"


def test_symlink_target_is_checked_and_named(tmp_path: Path) -> None:
    target = _key(tmp_path, 0o644, "real.key")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    with pytest.raises(KeyFileError) as err:
        check_private_key_file(link, "mqtt.key")
    assert str(err.value) == (f"{link} (a symlink to {target}): mqtt.key is accessible by "
                              f"group/others (mode 0644); run: chmod 600 {target}")
    os.chmod(target, 0o600)
    check_private_key_file(link, "mqtt.key")      # the link's own mode (0777) does not matter


def test_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "gone.key")
    with pytest.raises(KeyFileError, match=r"symlink to .*gone\.key\): mqtt\.key not found "
                                           r"\(dangling symlink\)"):
        check_private_key_file(link, "mqtt.key")


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_owned_by_another_user(tmp_path: Path) -> None:
    path = _key(tmp_path, 0o600)
    os.chown(path, 65534, -1)
    with pytest.raises(KeyFileError) as err:
        check_private_key_file(path, "signing.key")
    message = str(err.value)
    assert message.startswith(f"{path}: signing.key is owned by uid 65534")
    assert f"the agent runs as uid {os.geteuid()}" in message
    assert "(mode 0600)" in message
    assert message.endswith(f"run: chown {os.geteuid()} {path}")


def test_credentials_directory_is_trusted_as_systemd_makes_it(tmp_path: Path,
                                                              monkeypatch) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o500 | 0o200)
    # Owned by root with a read ACL for the service user: stat shows the ACL mask as group r.
    acl_like = _key(creds, 0o440, "mqtt.key")
    check_private_key_file(acl_like, "mqtt.key", credentials_dir=creds)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    check_private_key_file(acl_like, "mqtt.key")                  # from the environment
    os.chmod(acl_like, 0o444)
    with pytest.raises(KeyFileError, match=r"accessible by others \(mode 0444\)"):
        check_private_key_file(acl_like, "mqtt.key")
    # The same 0440 file outside the credentials directory is refused.
    outside = _key(tmp_path, 0o440, "outside.key")
    with pytest.raises(KeyFileError, match=r"mode 0440"):
        check_private_key_file(outside, "mqtt.key")


def test_credentials_directory_prefix_is_not_fooled(tmp_path: Path) -> None:
    creds = tmp_path / "cred"
    creds.mkdir()
    sibling = tmp_path / "cred-evil"
    sibling.mkdir()
    key = _key(sibling, 0o640)
    with pytest.raises(KeyFileError, match="group/others"):
        check_private_key_file(key, "mqtt.key", credentials_dir=creds)


# --------------------------------------------------------------------------- config paths

def test_expand_credentials_path() -> None:
    env = {"CREDENTIALS_DIRECTORY": "/run/credentials/car-agent.service"}
    assert (expand_credentials_path("${CREDENTIALS_DIRECTORY}/mqtt.key", environ=env)
            == "/run/credentials/car-agent.service/mqtt.key")
    assert expand_credentials_path("/etc/car-agent/ca.crt", environ=env) == "/etc/car-agent/ca.crt"
    assert expand_credentials_path("pki/VIN1.key", environ={}) == "pki/VIN1.key"


def test_expand_credentials_path_errors() -> None:
    with pytest.raises(ConfigError, match=r"^car\.yaml: mqtt\.key: .* which is not set"):
        expand_credentials_path("${CREDENTIALS_DIRECTORY}/mqtt.key", "car.yaml: mqtt.key",
                                environ={})
    with pytest.raises(ConfigError, match="only"):
        expand_credentials_path("${HOME}/mqtt.key", environ={"HOME": "/root"})
    with pytest.raises(ConfigError, match="expected"):
        expand_credentials_path("${CREDENTIALS_DIRECTORY}/", environ={"CREDENTIALS_DIRECTORY": "/x"})


def test_unset_credentials_directory_left_for_the_key_check(tmp_path: Path) -> None:
    # Offline commands (decode, check-config) load the production config outside systemd.
    value = expand_credentials_path("${CREDENTIALS_DIRECTORY}/mqtt.key", environ={},
                                    unset_ok=True)
    assert value == "${CREDENTIALS_DIRECTORY}/mqtt.key"
    # As the config loader would resolve it against the config's folder:
    with pytest.raises(KeyFileError) as err:
        check_private_key_file(tmp_path / value, "mqtt.key")
    assert str(err.value) == (
        f"{tmp_path / value}: mqtt.key uses ${{CREDENTIALS_DIRECTORY}}, which is not set "
        "(systemd sets it for a unit with LoadCredential=; outside systemd give the key's "
        "real path)")


# --------------------------------------------------------------------------- expiry

@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("expiry-ca")
    init_ca(directory, now=NOW - dt.timedelta(days=400))
    return directory


def _cert(ca_dir: Path, tmp_path: Path, cn: str, not_after: dt.datetime) -> Path:
    cert, _ = issue_client_cert(tmp_path, cn, ca_dir=ca_dir,
                                not_before=NOW - dt.timedelta(days=300), not_after=not_after)
    return cert


def test_no_warning_when_far_from_expiry(ca_dir: Path, tmp_path: Path) -> None:
    cert = _cert(ca_dir, tmp_path, "VIN1", NOW + dt.timedelta(days=90))
    assert certificate_expiry_warning(cert, 30, now=NOW) is None


def test_warning_within_warn_days(ca_dir: Path, tmp_path: Path) -> None:
    cert = _cert(ca_dir, tmp_path, "VIN1", NOW + dt.timedelta(days=12, hours=3))
    assert certificate_expiry_warning(cert, 30, now=NOW) == (
        f"client certificate {cert} expires in 12 days (2030-06-13 15:00 UTC)")
    assert certificate_expiry_warning(cert, 12, now=NOW) is None
    assert certificate_expiry_warning(cert, 13, now=NOW) is not None


def test_warning_one_day_and_naive_now(ca_dir: Path, tmp_path: Path) -> None:
    cert = _cert(ca_dir, tmp_path, "VIN1", NOW + dt.timedelta(days=1, minutes=1))
    assert certificate_expiry_warning(cert, 30, now=NOW.replace(tzinfo=None)) == (
        f"client certificate {cert} expires in 1 day (2030-06-02 12:01 UTC)")


def test_expired(ca_dir: Path, tmp_path: Path) -> None:
    cert = _cert(ca_dir, tmp_path, "VIN1", NOW - dt.timedelta(days=2))
    assert certificate_expiry_warning(cert, 30, now=NOW) == (
        f"client certificate {cert} EXPIRED on 2030-05-30 12:00 UTC")
    assert certificate_expiry_warning(cert, 0, now=NOW) is not None


def test_not_yet_valid_says_check_the_clock(ca_dir: Path, tmp_path: Path) -> None:
    cert = _cert(ca_dir, tmp_path, "VIN1", NOW + dt.timedelta(days=90))
    warning = certificate_expiry_warning(cert, 30, now=NOW - dt.timedelta(days=3650))
    assert warning is not None and "not valid before" in warning and "clock" in warning


def test_unreadable_certificate(tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    assert "cannot be read" in certificate_expiry_warning(missing, 30)
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    assert "cannot be read" in certificate_expiry_warning(garbage, 30)


def test_default_now_is_the_real_clock(ca_dir: Path, tmp_path: Path) -> None:
    real_now = dt.datetime.now(dt.timezone.utc)
    cert, _ = issue_client_cert(tmp_path, "VIN2", ca_dir=ca_dir,
                                not_before=real_now - dt.timedelta(days=1),
                                not_after=real_now + dt.timedelta(days=5, hours=1))
    assert "expires in 5 days" in certificate_expiry_warning(cert, 30)


# --------------------------------------------------------------------------- rotation

def test_file_watcher_unchanged(tmp_path: Path) -> None:
    a, b = tmp_path / "a.crt", tmp_path / "a.key"
    a.write_text("cert")
    b.write_text("key")
    watcher = FileWatcher([a, b])
    assert watcher.changed() is False
    assert watcher.changed() is False


def test_file_watcher_sees_a_rewrite(tmp_path: Path) -> None:
    cert = tmp_path / "vin.crt"
    cert.write_text("old certificate")
    watcher = FileWatcher([cert])
    cert.write_text("a new, longer certificate")
    assert watcher.changed() is True
    assert watcher.changed() is False           # reported once


def test_file_watcher_sees_a_same_size_rewrite(tmp_path: Path) -> None:
    cert = tmp_path / "vin.crt"
    cert.write_text("AAAA")
    before = os.stat(cert)
    watcher = FileWatcher([cert])
    cert.write_text("BBBB")
    # Coarse file system timestamps could hide a quick rewrite; make the clock visibly move.
    os.utime(cert, ns=(before.st_atime_ns, before.st_mtime_ns + 10_000_000))
    assert watcher.changed() is True


def test_file_watcher_sees_an_atomic_rename_over(tmp_path: Path) -> None:
    key = tmp_path / "vin.key"
    key.write_text("same")
    watcher = FileWatcher([tmp_path / "vin.crt", key])
    staged = tmp_path / ".vin.key.new"
    staged.write_text("same")
    os.utime(staged, ns=(os.stat(key).st_atime_ns, os.stat(key).st_mtime_ns))  # only the inode differs
    keep_alive = open(key)           # the old inode stays allocated: no inode number reuse
    try:
        os.replace(staged, key)
        assert watcher.changed() is True
        assert watcher.changed() is False
    finally:
        keep_alive.close()


def test_file_watcher_sees_removal_and_return(tmp_path: Path) -> None:
    key = tmp_path / "vin.key"
    key.write_text("k1")
    watcher = FileWatcher([key])
    key.unlink()
    assert watcher.changed() is True
    assert watcher.missing() == [key]
    key.write_text("k2")
    assert watcher.changed() is True
    assert watcher.missing() == []
