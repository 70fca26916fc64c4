"""The attacker inside a pod: what a container with CAP_NET_RAW can do.

Run in a pod's namespace with every capability dropped except CAP_NET_RAW
(``setpriv --bounding-set=-all,+net_raw``, see adversary.py); it reads one
JSON command per line on stdin and answers one JSON line on stdout. The
standard library only, so a command costs milliseconds, not a scapy import:
the test process crafts frames with scapy and hands them over as hex.

Commands (``op``):

* ``caps`` -- the process's effective capability mask (to prove the limit).
* ``frames`` -- write Ethernet frames (hex) to ``eth0`` through an AF_PACKET
  socket, in order, ``gap`` seconds apart. With ``vnet_hdr_len`` the socket
  has PACKET_VNET_HDR on and each frame is preceded by a virtio_net_hdr whose
  ``hdr_len`` is that value: the kernel then puts only that many bytes in the
  linear part of the skb and the rest in page fragments.
* ``connect`` -- a real kernel TCP connection: optional source port (bound
  with SO_REUSEADDR), optional IP options (IP_OPTIONS), optional data sent in
  the SYN (TCP Fast Open, MSG_FASTOPEN); sends ``payload``, reads one line.
  Answers ``outcome`` (``replied`` / ``reset`` / ``refused`` / ``timeout`` /
  ``closed`` / ``error``), the local address used, and the reply.
* ``isn`` -- the initial sequence number this kernel uses for a 4-tuple
  now: a non-blocking connect from ``src_port``, its SYN read back from
  ``eth0``, the socket reset at once. Linux derives the ISN from a keyed
  hash of the 4-tuple (one key per boot, not per namespace) plus a clock
  ticking every 64 ns (net/core/secure_seq.c, seq_scale), so the next SYN
  on that 4-tuple is predictable from this one and the time.
* ``udp`` -- datagrams from a kernel UDP socket (the kernel fragments what
  exceeds the MTU).
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import struct
import sys
import time
from typing import Any

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15  # include/uapi/linux/if_packet.h
MSG_FASTOPEN = 0x20000000
PACKET_OUTGOING = 4


def caps() -> dict[str, Any]:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return {"cap_eff": int(line.split()[1], 16)}
    return {"cap_eff": None}


def frames(cmd: dict[str, Any]) -> dict[str, Any]:
    hdr_len = cmd.get("vnet_hdr_len")
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        if hdr_len is not None:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((cmd.get("ifname", "eth0"), 0))
        sent = 0
        for i, text in enumerate(cmd["frames"]):
            if i and cmd.get("gap"):
                time.sleep(cmd["gap"])
            frame = bytes.fromhex(text)
            if hdr_len is not None:
                # struct virtio_net_hdr (include/uapi/linux/virtio_net.h): flags,
                # gso_type (NONE), hdr_len, gso_size, csum_start, csum_offset.
                # No NEEDS_CSUM: the frame carries its own checksums.
                frame = struct.pack("<BBHHHH", 0, 0, hdr_len, 0, 0, 0) + frame
            sent += sock.send(frame)
        return {"sent": sent}
    finally:
        sock.close()


def connect(cmd: dict[str, Any]) -> dict[str, Any]:
    dst = cmd["dst"]
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    timeout = float(cmd.get("timeout", 3.0))
    sock = socket.socket(fam, socket.SOCK_STREAM)
    result: dict[str, Any] = {"outcome": "error", "local": None, "reply": ""}
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if cmd.get("ip_options"):
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes.fromhex(cmd["ip_options"]))
        if cmd.get("src_port"):
            sock.bind((cmd["src"], int(cmd["src_port"])))
        sock.settimeout(timeout)
        payload = cmd.get("payload", "hello\n").encode()
        if cmd.get("fastopen"):
            # The data rides in the SYN (TCP_FASTOPEN client mode; the harness
            # enables cookie-less client TFO in the pod's sysctl).
            sock.sendto(payload, MSG_FASTOPEN, (dst, int(cmd["port"])))
        else:
            sock.connect((dst, int(cmd["port"])))
            result["local"] = list(sock.getsockname()[:2])
            sock.sendall(payload)
        result["local"] = list(sock.getsockname()[:2])
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        result["reply"] = buf.decode(errors="replace").strip()
        result["outcome"] = "replied" if buf else "closed"
    except ConnectionRefusedError:
        result["outcome"] = "refused"
    except ConnectionResetError:
        result["outcome"] = "reset"
    except TimeoutError:
        result["outcome"] = "timeout"
    except OSError as exc:
        result["outcome"] = "reset" if exc.errno == errno.ECONNRESET else "error"
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if result["local"] is None:
            with contextlib.suppress(OSError):
                result["local"] = list(sock.getsockname()[:2])
        sock.close()
    return result


def isn(cmd: dict[str, Any]) -> dict[str, Any]:
    dst, port = cmd["dst"], int(cmd["src_port"])
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    cap.bind((cmd.get("ifname", "eth0"), 0))
    cap.settimeout(1.0)
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((cmd["src"], port))
        sock.setblocking(False)
        t_ns = time.time_ns()
        sock.connect_ex((dst, int(cmd["port"])))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                frame, addr = cap.recvfrom(65535)
            except TimeoutError:
                break
            if addr[2] != PACKET_OUTGOING:
                continue
            seq = _syn_seq(frame, port)
            if seq is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return {"isn": seq, "t_ns": t_ns}
        return {"error": f"no SYN from port {port} seen on the pod's interface"}
    finally:
        sock.close()
        cap.close()


def _syn_seq(frame: bytes, sport: int) -> int | None:
    ethertype = struct.unpack("!H", frame[12:14])[0]
    if ethertype == 0x0800 and frame[23] == 6:
        tcp = frame[14 + (frame[14] & 0x0F) * 4 :]
    elif ethertype == 0x86DD and frame[20] == 6:
        tcp = frame[54:]
    else:
        return None
    if len(tcp) < 20 or struct.unpack("!H", tcp[:2])[0] != sport or tcp[13] & 0x12 != 0x02:
        return None
    seq: int = struct.unpack("!I", tcp[4:8])[0]
    return seq


def udp(cmd: dict[str, Any]) -> dict[str, Any]:
    dst = cmd["dst"]
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        sock.bind((cmd["src"], int(cmd.get("src_port", 0))))
        payload = bytes.fromhex(cmd["payload"]) if "payload" in cmd else b"x" * int(cmd["size"])
        sent = 0
        for _ in range(int(cmd.get("count", 1))):
            try:
                sent += sock.sendto(payload, (dst, int(cmd["port"])))
            except OSError as exc:  # e.g. an ICMP error reported on a later send
                return {"sent": sent, "error": f"{type(exc).__name__}: {exc}"}
            time.sleep(0.01)
        return {"sent": sent, "local": list(sock.getsockname()[:2])}
    finally:
        sock.close()


OPS = {
    "caps": lambda cmd: caps(),
    "frames": frames,
    "connect": connect,
    "isn": isn,
    "udp": udp,
}


def main() -> None:
    print(json.dumps({"ready": True, **caps()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        try:
            answer = OPS[cmd["op"]](cmd)
        except Exception as exc:  # report, keep serving the next command
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
