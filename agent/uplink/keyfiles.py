"""Checks on the files holding the agent's secrets, and a watcher for their rotation.

- :func:`check_private_key_file` refuses a private key that other users could read or that
  belongs to another user, before the agent loads it (one line: file, mode, and the fix).
- :func:`certificate_expiry_warning` says when the client certificate is about to expire.
- :class:`FileWatcher` notices that credentials were replaced (rewritten in place or renamed
  over), so the uplink can rebuild its TLS context and reconnect.

Config paths naming ``${CREDENTIALS_DIRECTORY}/name`` (keys that systemd hands to the service
with ``LoadCredential=``) are expanded where config is read (:mod:`agent.schema`).

Files in systemd's credentials directory are trusted as systemd made them: the directory is a
private mount of the service, and depending on the file system systemd either chowns each file
to the service user (mode 0400) or leaves it owned by root and grants the service user read
access through a POSIX ACL (then ``stat`` shows mode 0440). There only "a regular file we can
read, nothing for others" is required.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from pathlib import Path
from typing import Iterable

from agent.errors import KeyFileError
from agent.schema import CREDENTIALS_PREFIX, CREDENTIALS_VARIABLE

__all__ = ["check_private_key_file", "certificate_expiry_warning", "certificate_validity",
           "FileWatcher"]



# --------------------------------------------------------------------------- reading

def read_key_material(path: Path, expected: str, where: str | None = None) -> bytes:
    """The bytes of a key or certificate file; KeyFileError naming it (and ``where``, the
    config key it came from) when it is missing, a directory or unreadable."""
    prefix = f"{where}: {path}" if where else f"{path}"
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{prefix}: file not found") from None
    except IsADirectoryError:
        raise KeyFileError(f"{prefix}: is a directory, expected {expected}") from None
    except OSError as exc:
        raise KeyFileError(f"{prefix}: cannot read: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------- permissions

def check_private_key_file(path: Path, what: str, *,
                           credentials_dir: str | Path | None = None) -> None:
    """Refuse a private key file that is missing, not a regular file, accessible by group or
    others, or owned by another user than our effective uid.

    ``what`` names the key in messages (e.g. ``"mqtt.key"``). A symlink is followed (the target
    is checked) and the message says so. Files inside ``credentials_dir`` (default: the
    ``CREDENTIALS_DIRECTORY`` environment variable) get the relaxed check described in the
    module docstring.

    :raises KeyFileError: with a one-line message naming the file and its mode.
    """
    path = Path(path)
    name = str(path)
    if CREDENTIALS_PREFIX in name:      # left unexpanded: the variable was not set
        raise KeyFileError(f"{name}: {what} uses ${{{CREDENTIALS_VARIABLE}}}, which is not set "
                           "(systemd sets it for a unit with LoadCredential=; outside systemd "
                           "give the key's real path)")
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        raise KeyFileError(f"{name}: {what} not found") from None
    except OSError as exc:
        raise KeyFileError(f"{name}: {what} cannot be inspected: {exc.strerror or exc}") from None
    if stat.S_ISLNK(link.st_mode):
        target = os.path.realpath(path)
        name = f"{path} (a symlink to {target})"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise KeyFileError(f"{name}: {what} not found (dangling symlink)") from None
        except OSError as exc:
            raise KeyFileError(f"{name}: {what} cannot be inspected: "
                               f"{exc.strerror or exc}") from None
        fix_path = target
    else:
        st = link
        fix_path = str(path)
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{name}: {what} is not a regular file ({_kind(st.st_mode)}, "
                           f"mode {mode:04o})")

    if _inside(fix_path, credentials_dir):
        if mode & 0o007:
            raise KeyFileError(f"{name}: {what} is accessible by others (mode {mode:04o})")
        if not os.access(path, os.R_OK):
            raise KeyFileError(f"{name}: {what} is not readable by uid {os.geteuid()} "
                               f"(mode {mode:04o}, owner uid {st.st_uid})")
        return

    if mode & 0o077:
        raise KeyFileError(f"{name}: {what} is accessible by group/others (mode {mode:04o}); "
                           f"run: chmod 600 {fix_path}")
    euid = os.geteuid()
    if st.st_uid != euid:
        raise KeyFileError(f"{name}: {what} is owned by uid {st.st_uid}{_user(st.st_uid)}, "
                           f"but the agent runs as uid {euid}{_user(euid)} (mode {mode:04o}); "
                           f"run: chown {euid} {fix_path}")


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _user(uid: int) -> str:
    try:
        import pwd
        return f" ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return ""


def _inside(path: str, directory: str | Path | None) -> bool:
    if directory is None:
        directory = os.environ.get(CREDENTIALS_VARIABLE)
    if not directory:
        return False
    base = os.path.realpath(directory)
    real = os.path.realpath(path)
    return os.path.commonpath([base, real]) == base and real != base


# --------------------------------------------------------------------------- certificates

def certificate_expiry_warning(cert_path: Path, warn_days: int,
                               now: dt.datetime | None = None) -> str | None:
    """None if the certificate is valid for more than ``warn_days`` days, else one line.

    Also warns about a certificate that cannot be read or is not valid yet (the car's clock is
    wrong, or the certificate was issued in the future).
    """
    cert_path = Path(cert_path)
    if now is None:
        now = dt.datetime.now(dt.timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=dt.timezone.utc)
    try:
        not_before, not_after = certificate_validity(cert_path)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"client certificate {cert_path} cannot be read: {reason}"
    if not_after <= now:
        return f"client certificate {cert_path} EXPIRED on {_when(not_after)}"
    if not_before > now:
        return (f"client certificate {cert_path} is not valid before {_when(not_before)} "
                f"(is the system clock right? it says {_when(now)})")
    left = not_after - now
    if left <= dt.timedelta(days=warn_days):
        days = left.days
        return (f"client certificate {cert_path} expires in {days} day{'' if days == 1 else 's'} "
                f"({_when(not_after)})")
    return None


def certificate_validity(cert_path: Path) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter), UTC, of the PEM certificate in ``cert_path``: read by the
    libcrypto that signs (no cryptography package on the car), else by cryptography.

    :raises OSError: the file cannot be read. :raises ValueError: it holds no certificate.
    """
    # Imported here: config loading imports this module, keep that light.
    from agent.uplink import libcrypto

    data = Path(cert_path).read_bytes()
    if libcrypto.binding() is not None:
        return libcrypto.certificate_validity(data)
    from cryptography import x509
    cert = x509.load_pem_x509_certificate(data)
    return cert.not_valid_before_utc, cert.not_valid_after_utc


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- rotation

_Snapshot = tuple[int, int, int] | None


class FileWatcher:
    """Tells whether any of ``paths`` changed since the last look.

    A file's identity is ``(st_mtime_ns, st_size, st_ino)`` of its target (symlinks followed),
    so both a rewrite in place and an atomic rename over it are seen; so is a file that
    disappears or appears. Each call of :meth:`changed` compares with the previous call (the
    first with the state at construction), so every change is reported once.

    For credential rotation: when it returns True, rebuild the TLS context; if that fails
    (e.g. the certificate was replaced but its key not yet), keep the old context: the next
    write changes the files again and :meth:`changed` reports it.
    """

    def __init__(self, paths: Iterable[str | Path]) -> None:
        self.paths: tuple[Path, ...] = tuple(Path(p) for p in paths)
        self._last = self._snapshot()

    def _snapshot(self) -> tuple[_Snapshot, ...]:
        snaps: list[_Snapshot] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                snaps.append(None)
            else:
                snaps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(snaps)

    def changed(self) -> bool:
        current = self._snapshot()
        if current == self._last:
            return False
        self._last = current
        return True

    def missing(self) -> list[Path]:
        """The watched files that do not exist (as of the last :meth:`changed`)."""
        return [p for p, s in zip(self.paths, self._last) if s is None]
