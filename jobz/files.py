"""Files jobz keeps: private state folders, private files, and folders re-read when they change."""
import os
import stat


class UnsafePath(Exception):
    """A path jobz refuses to keep state or secrets in; the message says why and what to do."""


def state_dir(path: str) -> str:
    """Create `path` (mode 0700) or check an existing one: a real folder of ours that only we can write.

    A folder someone else owns or can write to, or a symlink, could make us write state or keys
    where that someone chose."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(path, mode=0o700)
        return path
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f'{path} is a symbolic link; give the real folder')
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f'{path} is not a folder')
    if st.st_uid != os.geteuid():
        raise UnsafePath(f'{path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}): '
                         'use a folder of our own')
    if st.st_mode & 0o022:
        raise UnsafePath(f'{path} can be written by others (mode {stat.S_IMODE(st.st_mode):o}): '
                         f'chmod go-w {path}')
    return path


def private_file(path: str) -> str:
    """Make sure `path` exists as a regular file only we can read (0600) before a database opens it.

    SQLite gives its -wal and -shm files the mode of the database file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f'{path} is not a regular file')
        os.fchmod(fd, 0o600)    # one made by an older version may be 0644
    finally:
        os.close(fd)
    return path


def write_new(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write a file that must not exist yet, with its mode from the start (never chmodded after).

    O_EXCL refuses anything at `path`, a symbolic link (dangling or not) included."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, 'wb') as f:
        f.write(data)


def write_replace(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace a file atomically: a new temp file beside it, then os.replace."""
    tmp = f'{path}.{os.getpid()}.tmp'
    if os.path.lexists(tmp):
        os.unlink(tmp)
    write_new(tmp, data, mode)
    os.replace(tmp, path)


class WatchedFolder:
    """A folder of files ending in `suffix`, re-read by the caller whenever one is added, changed or removed."""

    def __init__(self, folder: str, suffix: str):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'{folder}: no such folder')
        self.folder, self.suffix = folder, suffix
        self.signature = None

    def changed(self) -> list[tuple[str, str]] | None:
        """(name without suffix, path) of every file if anything changed since last time, else None.

        A file removed between listing and looking is simply not there: revoking by deleting a
        file must never crash the reader."""
        files, signature = [], []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if not entry.name.endswith(self.suffix):
                    continue
                try:
                    signature.append((entry.name, entry.stat().st_mtime_ns))
                except FileNotFoundError:
                    continue
                files.append((entry.name[:-len(self.suffix)], entry.path))
        signature.sort()
        if signature == self.signature:
            return None
        self.signature = signature
        return sorted(files)
