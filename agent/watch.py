"""Notice edits of the policy file, however they are made.

Editors and tools change a file in three ways, and all must trigger a reload:

* in place (``>``, ``truncate`` + write): IN_MODIFY / IN_CLOSE_WRITE on the file;
* write a temporary file and rename it over (vim, ``mv``, Ansible): IN_MOVED_TO;
* Kubernetes ConfigMap volumes: the file is a symlink through ``..data``,
  itself a symlink that the kubelet swaps atomically by renaming a new
  ``..data_tmp`` over it (IN_MOVED_TO of ``..data`` in the folder).

Watching the file itself misses the last two (a watch follows the inode, which
a rename replaces), so the *folder* holding the policy file is watched, and
every event in it is a hint: the caller re-reads the file and compares content
hashes, so spurious events cost one read. Only names that can change what the path
resolves to count: the file's own name, the symlink target's name, and the
kubelet's ``..``-prefixed entries; other files in the folder (an audit log
written next to the policy, say) are ignored. Bursts are coalesced by the caller.
inotify(7) has no binding in the standard library; this uses libc via ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct

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
        for folder in folders:
            wd = self._libc.inotify_add_watch(fd, os.fsencode(folder), WATCH_MASK)
            if wd < 0:
                err = ctypes.get_errno()
                os.close(fd)
                hint = ""
                if err == errno.ENOSPC:
                    hint = " (raise fs.inotify.max_user_watches)"
                raise OSError(err, f"cannot watch {folder}: {os.strerror(err)}{hint}")
        self.folders = folders

    def fileno(self) -> int:
        return int(self._fd)

    def drain(self) -> list[str]:
        """Read all pending events; returns the names they concern."""
        names: list[str] = []
        while True:
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset + _EVENT_HEADER.size <= len(data):
                _wd, _mask, _cookie, length = _EVENT_HEADER.unpack_from(data, offset)
                start = offset + _EVENT_HEADER.size
                names.append(data[start : start + length].rstrip(b"\0").decode(errors="replace"))
                offset = start + length

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PolicyFileWatch:
    """Watches what can change the file at ``path``; ``changed()`` drains events
    and says whether any concerned it."""

    def __init__(self, path: str) -> None:
        absolute = os.path.abspath(path)
        target = os.path.realpath(absolute)
        folders = sorted({os.path.dirname(absolute), os.path.dirname(target)})
        self._names = {os.path.basename(absolute), os.path.basename(target)}
        self._watch = FolderWatch(folders)

    def fileno(self) -> int:
        return self._watch.fileno()

    def changed(self) -> bool:
        return any(n in self._names or n.startswith("..") for n in self._watch.drain())

    def close(self) -> None:
        self._watch.close()
