"""Run a loaded tc classifier on one packet in the kernel, without attaching
it anywhere (``BPF_PROG_TEST_RUN``): what the tests and the benchmark use
to see the classifier's verdict and its cost per packet.

The kernel builds a linear skb from the bytes (Ethernet header first, as at
tc ingress), runs the program ``repeat`` times and reports the return value
(the tc action), the ``__sk_buff`` afterwards (the mark) and the mean time
per run. ``mark`` and ``ingress_ifindex`` are set in the skb beforehand.
"""

from __future__ import annotations

import ctypes as ct
import os
import struct
from dataclasses import dataclass

BPF_PROG_TEST_RUN = 10  # include/uapi/linux/bpf.h, enum bpf_cmd
SYS_BPF = 321  # x86_64
TC_ACT_OK = 0  # include/uapi/linux/pkt_cls.h
TC_ACT_SHOT = 2

# struct __sk_buff (include/uapi/linux/bpf.h): the fields a test run may set
# are mark (offset 8), priority (32) and ingress_ifindex (36); the rest of
# what is passed must be zero.
_CTX = struct.Struct("=8xI24xI")
_MARK_OFFSET = 8


class _TestRunAttr(ct.Structure):
    # union bpf_attr, the BPF_PROG_TEST_RUN member (include/uapi/linux/bpf.h).
    _fields_ = [  # noqa: RUF012 - ctypes reads it
        ("prog_fd", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("data_in", ct.c_uint64),
        ("data_out", ct.c_uint64),
        ("repeat", ct.c_uint32),
        ("duration", ct.c_uint32),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("ctx_in", ct.c_uint64),
        ("ctx_out", ct.c_uint64),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


@dataclass(frozen=True, kw_only=True)
class Run:
    action: int  # the program's return value: TC_ACT_OK, TC_ACT_SHOT, ...
    mark: int  # skb->mark afterwards
    ns: float  # mean time per run


_libc = ct.CDLL(None, use_errno=True)


def run_classifier(
    prog_fd: int, packet: bytes, *, mark: int = 0, ingress_ifindex: int = 0, repeat: int = 1
) -> Run:
    data = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(len(packet) + 256)
    ctx_in = ct.create_string_buffer(_CTX.pack(mark, ingress_ifindex), _CTX.size)
    ctx_out = ct.create_string_buffer(256)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=len(out),
        data_in=ct.addressof(data),
        data_out=ct.addressof(out),
        repeat=repeat,
        ctx_size_in=_CTX.size,
        ctx_in=ct.addressof(ctx_in),
        ctx_size_out=len(ctx_out),
        ctx_out=ct.addressof(ctx_out),
    )
    if _libc.syscall(SYS_BPF, BPF_PROG_TEST_RUN, ct.byref(attr), ct.sizeof(attr)) != 0:
        err = ct.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    (mark_out,) = struct.unpack_from("=I", ctx_out.raw, _MARK_OFFSET)
    return Run(action=attr.retval, mark=mark_out, ns=float(attr.duration))
