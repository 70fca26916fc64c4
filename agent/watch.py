"""Notice edits of the policy file, however they are made.

Editors and tools change a file in three ways, and all must trigger a reload:

* in place (``>``, ``truncate`` + write): IN_MODIFY / IN_CLOSE_WRITE on the file;
* write a temporary file and rename it over (vim, ``mv``, Ansible): IN_MOVED_TO;
* Kubernetes ConfigMap volumes: the file is a symlink through ``..data``,
  itself a symlink that the kubelet swaps atomically by renaming a new
  ``..data_tmp`` over it (IN_MOVED_TO of ``..data`` in the folder).

Watching the file itself misses the last two (a watch follows the inode, which
a rename replaces), so the *folders* are watched, and every event in them is a
hint: the caller re-reads the file and compares content hashes, so spurious
events cost one read.

The path may lead through symlinks to a file elsewhere (config management, a
checkout whose ``current`` link is swapped to a new release): every entry the
path resolves through -- each symlink on the way, file or folder, and the
file it ends at -- is watched in its own folder, and after each event the
path is resolved again, so a link pointed somewhere new brings its new
folders in and drops the old ones. Only those entries' names count, and the
kubelet's ``..``-prefixed ones; other files in the folders (an audit log
written next to the policy, say) are ignored. Bursts are coalesced by the
caller. inotify(7) has no binding in the standard library; this uses libc via
ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import struct

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000

WATCH_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)
_EVENT_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


# Symlinks followed before giving up, as the kernel does (ELOOP after 40).
_MAX_LINKS = 40


def resolution(path: str) -> list[tuple[str, str]]:
    """The entries ``path`` resolves through, as (folder, name): each symlink
    met on the way (a file or a folder link, in the order followed) and last
    the entry it ends at, which may not exist. A change of any of them can
    change what the path reads."""
    entries: list[tuple[str, str]] = []
    todo = os.path.abspath(path).split("/")[1:]
    folder = "/"
    links = 0
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            folder = os.path.dirname(folder)
            continue
        here = os.path.join(folder, name)
        if links < _MAX_LINKS and os.path.islink(here):
            links += 1
            entries.append((folder, name))
            try:
                target = os.readlink(here)
            except OSError:
                break
            if target.startswith("/"):
                folder = "/"
            todo = target.split("/") + todo
            continue
        if not todo:
            entries.append((folder, name))
        folder = here
    return entries


class FolderWatch:
    """An inotify watch on folders; ``fileno()`` becomes readable on events."""

    def __init__(self, folders: list[str]) -> None:
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(libc_name, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._wds: dict[str, int] = {}  # folder -> watch descriptor
        try:
            for folder in folders:
                self.add(folder)
        except OSError:
            os.close(fd)
            raise

    @property
    def folders(self) -> list[str]:
        return sorted(self._wds)

    def add(self, folder: str) -> None:
        if folder in self._wds:
            return
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), WATCH_MASK)
        if wd < 0:
            err = ctypes.get_errno()
            hint = ""
            if err == errno.ENOSPC:
                hint = " (raise fs.inotify.max_user_watches)"
            raise OSError(err, f"cannot watch {folder}: {os.strerror(err)}{hint}")
        self._wds[folder] = wd

    def remove(self, folder: str) -> None:
        wd = self._wds.pop(folder, None)
        if wd is not None:
            # Fails harmlessly when the kernel already dropped the watch (the
            # folder was deleted).
            self._libc.inotify_rm_watch(self._fd, wd)

    def fileno(self) -> int:
        return int(self._fd)

    def drain(self) -> list[tuple[str, str]]:
        """Read all pending events; returns the (folder, name) they concern."""
        folders = {wd: folder for folder, wd in self._wds.items()}
        events: list[tuple[str, str]] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                start = offset + _EVENT_HEADER.size
                name = data[start : start + length].rstrip(b"\0").decode(errors="replace")
                events.append((folders.get(wd, ""), name))
                offset = start + length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PolicyFileWatch:
    """Watches what can change the file at ``path``; ``changed()`` drains events
    and says whether any concerned it."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._entries: set[tuple[str, str]] = set()
        self._watch = FolderWatch([])
        try:
            self._follow()
        except OSError:
            self._watch.close()
            raise

    @property
    def folders(self) -> list[str]:
        return self._watch.folders

    def _follow(self) -> None:
        """Watch the folders of what the path resolves through now. The
        policy's own folder must be watchable; a folder further along that
        does not exist (yet) is left to the next event or the periodic check."""
        entries = resolution(self._path)
        wanted = {folder for folder, _ in entries}
        for folder in sorted(wanted - set(self._watch.folders)):
            try:
                self._watch.add(folder)
            except OSError as exc:
                if folder == entries[0][0] or exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    raise
                wanted.discard(folder)
        for folder in set(self._watch.folders) - wanted:
            self._watch.remove(folder)
        self._entries = set(entries)

    def fileno(self) -> int:
        return self._watch.fileno()

    def changed(self) -> bool:
        hit = any(
            entry in self._entries or entry[1].startswith("..") for entry in self._watch.drain()
        )
        if hit:
            try:
                self._follow()
            except OSError as exc:  # keep the watches there are
                log.warning(
                    "cannot watch where %s leads now: %s; the periodic check still"
                    " notices its edits",
                    self._path,
                    exc,
                )
        return hit

    def close(self) -> None:
        self._watch.close()
